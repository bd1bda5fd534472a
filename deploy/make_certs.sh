#!/usr/bin/env bash
# Make the keys and certificates of a fedsynth deployment.
#
#   deploy/make_certs.sh OUT_DIR SITE_NAME [SITE_NAME ...]
#
# Creates (and never overwrites: run it again to add sites, the CA and the SuperLink certificate are kept):
#   OUT_DIR/ca.key              the certificate authority's private key  -> keep OFFLINE, never ship it
#   OUT_DIR/ca.crt              the CA certificate                        -> to every site and the coordinator CLI
#   OUT_DIR/superlink.key       the SuperLink's TLS private key           -> coordinator host only
#   OUT_DIR/superlink.crt       the SuperLink's TLS certificate (signed by the CA)
#   OUT_DIR/keys/SITE           the site's authentication private key     -> that site only (mode 600)
#   OUT_DIR/keys/SITE.pub       the site's public key                     -> coordinator (fedsynth coordinator registers it)
#
# Site keys are EC P-384 key pairs in OpenSSH format (what Flower's SuperNode authentication expects).
# In a real deployment each site should rather make its own key pair next to its data and send only
# the .pub file:   ssh-keygen -q -t ecdsa -b 384 -N "" -C SITE -f SITE
#
# The SuperLink certificate must name every address the SuperNodes and the CLI dial. By default it
# names localhost, 127.0.0.1 and ::1; add yours with SUPERLINK_SAN, e.g.
#   SUPERLINK_SAN="DNS:coordinator.example.org,IP:10.0.0.5" deploy/make_certs.sh certs site1 site2
# Validity: DAYS (default 365).
set -euo pipefail

usage() {
    echo "usage: $0 OUT_DIR SITE_NAME [SITE_NAME ...]" >&2
    echo "  site names: letters, digits, '-', '_' and '.' (e.g. site1 hospital-a)" >&2
    exit 2
}
[ "$#" -ge 2 ] || usage
for tool in openssl ssh-keygen; do
    command -v "$tool" >/dev/null 2>&1 || { echo "error: '$tool' is not installed; install it (e.g. apt-get install openssl openssh-client)" >&2; exit 1; }
done

OUT=$1
shift
DAYS=${DAYS:-365}
SAN="DNS:localhost,IP:127.0.0.1,IP:::1${SUPERLINK_SAN:+,$SUPERLINK_SAN}"
mkdir -p "$OUT/keys"
umask 077

for site in "$@"; do
    if ! [[ "$site" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]]; then
        echo "error: bad site name '$site': use letters, digits, '-', '_' and '.', starting with a letter or digit" >&2
        exit 2
    fi
done

if [ ! -f "$OUT/ca.key" ] || [ ! -f "$OUT/ca.crt" ]; then
    openssl req -x509 -newkey rsa:3072 -nodes -sha256 -days "$DAYS" \
        -subj "/O=fedsynth/CN=fedsynth deployment CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout "$OUT/ca.key" -out "$OUT/ca.crt" 2>/dev/null
    echo "made the CA:                  $OUT/ca.crt (its key $OUT/ca.key must stay offline)"
else
    echo "kept the existing CA:         $OUT/ca.crt"
fi

if [ ! -f "$OUT/superlink.key" ] || [ ! -f "$OUT/superlink.crt" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    openssl req -new -newkey rsa:3072 -nodes -subj "/O=fedsynth/CN=fedsynth superlink" \
        -keyout "$OUT/superlink.key" -out "$tmp/superlink.csr" 2>/dev/null
    printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' \
        "$SAN" > "$tmp/superlink.ext"
    openssl x509 -req -in "$tmp/superlink.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" -CAcreateserial \
        -out "$OUT/superlink.crt" -days "$DAYS" -sha256 -extfile "$tmp/superlink.ext" 2>/dev/null
    rm -f "$OUT/ca.srl"
    echo "made the SuperLink cert:      $OUT/superlink.crt for $SAN"
else
    echo "kept the SuperLink cert:      $OUT/superlink.crt"
fi
openssl verify -CAfile "$OUT/ca.crt" "$OUT/superlink.crt" >/dev/null

for site in "$@"; do
    key="$OUT/keys/$site"
    if [ -f "$key" ] && [ -f "$key.pub" ]; then
        echo "kept the key pair of $site:  $key(.pub)"
        continue
    fi
    rm -f "$key" "$key.pub"
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "$site" -f "$key"
    echo "made the key pair of $site:  $key (private, to the site) and $key.pub (to the coordinator)"
done
# Public material is readable; private keys stay 600.
chmod 644 "$OUT/ca.crt" "$OUT/superlink.crt" "$OUT"/keys/*.pub
