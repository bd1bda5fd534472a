"""Certificates and keys: the checks that make a wrong file fail before anything connects."""

from __future__ import annotations

import ipaddress
import re
import ssl
import time
from pathlib import Path
from typing import Protocol

from fedsynth.ops.fields import DeployError, parse_address, readable_file, warn



class ServerTLS(Protocol):
    """What the SuperLink's certificate check reads (a coordinator config has all of it)."""

    ca_cert: Path | None
    cert: Path | None
    key: Path | None
    address: str
    source: Path

def check_ca(path: Path, fix: str = "copy ca.crt from the coordinator operator (deploy/make_certs.sh makes it)") -> None:
    readable_file(path, "CA certificate", fix)
    try:
        ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, ValueError) as err:
        raise DeployError(f"CA certificate {path} is not a PEM certificate ({err}); use the ca.crt that "
                          "deploy/make_certs.sh wrote") from None


def check_private_key(path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    readable_file(path, "site private key", "make one with deploy/make_certs.sh (or ssh-keygen -t ecdsa -b 384 "
                                             "-N '' -f KEY) and point private_key at it")
    data = path.read_bytes()
    if b"PRIVATE KEY" not in data:
        raise DeployError(f"site private key {path} is not a private key file (a .pub file?); point private_key "
                          "at the file WITHOUT .pub")
    try:
        key = load_ssh_private_key(data, password=None)
    except TypeError:
        raise DeployError(f"site private key {path} is protected by a passphrase; Flower needs an unencrypted key: "
                          f"ssh-keygen -p -N '' -f {path}") from None
    except ValueError as err:
        raise DeployError(f"site private key {path} is not an OpenSSH private key ({err}); make one with "
                          "ssh-keygen -t ecdsa -b 384 -N '' -f KEY") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise DeployError(f"site private key {path} must be an EC key on a NIST curve (P-384 recommended), "
                          f"got {type(key).__name__}; make one with ssh-keygen -t ecdsa -b 384 -N '' -f KEY")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        warn(f"site private key {path} is readable by other users (mode {mode:o}); run: chmod 600 {path}")


def load_public_key(path: Path, site: str) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    readable_file(path, f"public key of site '{site}'", "ask the site for its .pub file (or run deploy/make_certs.sh)")
    data = path.read_bytes().strip()
    try:
        key = load_ssh_public_key(data)
    except (ValueError, TypeError) as err:
        raise DeployError(f"public key of site '{site}' ({path}) is not an OpenSSH public key ({err}); "
                          "it is the one-line .pub file ssh-keygen writes") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise DeployError(f"public key of site '{site}' ({path}) must be an EC key on a NIST curve (P-384), "
                          f"got {type(key).__name__}")
    return data.split()[1].decode()


def check_server_cert(cfg: ServerTLS) -> None:
    """The SuperLink's certificate and key: a pair, signed by the CA, valid, naming the address clients dial."""
    from cryptography import x509

    for key in ("ca_cert", "cert", "key"):
        if getattr(cfg, key) is None:
            raise DeployError(f"{cfg.source}: '{key}' is missing; TLS needs ca_cert, cert and key "
                              "(deploy/make_certs.sh writes ca.crt, superlink.crt and superlink.key)")
    check_ca(cfg.ca_cert, "run deploy/make_certs.sh (it writes ca.crt, superlink.crt and superlink.key) and set ca_cert")
    readable_file(cfg.cert, "SuperLink certificate", "run deploy/make_certs.sh")
    readable_file(cfg.key, "SuperLink private key", "run deploy/make_certs.sh")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(cfg.cert), str(cfg.key))
    except ssl.SSLError as err:
        raise DeployError(f"SuperLink certificate {cfg.cert} and key {cfg.key} do not form a pair ({err}); "
                          "use the two files deploy/make_certs.sh wrote together") from None
    try:
        cert = x509.load_pem_x509_certificate(cfg.cert.read_bytes())
        ca = x509.load_pem_x509_certificate(cfg.ca_cert.read_bytes())
    except ValueError as err:
        raise DeployError(f"cannot read the certificates ({err}); they must be PEM files") from None
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:
        raise DeployError(f"SuperLink certificate {cfg.cert} was not signed by the CA {cfg.ca_cert}; sites would "
                          "refuse it. Re-make it with deploy/make_certs.sh using the same CA") from None
    now = time.time()
    if cert.not_valid_after_utc.timestamp() < now:
        raise DeployError(f"SuperLink certificate {cfg.cert} expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
                          "delete it and its key and run deploy/make_certs.sh again")
    host, _ = parse_address(cfg.address, "address")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    names = set(san.get_values_for_type(x509.DNSName)) if san else set()
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} if san else set()
    try:
        ok = str(ipaddress.ip_address(host)) in ips
    except ValueError:
        ok = host in names
    if not ok:
        raise DeployError(f"SuperLink certificate {cfg.cert} does not name '{host}' (it names {sorted(names | ips)}); "
                          f"clients dialing {cfg.address} would fail TLS. Delete it and its key, then re-make it with "
                          f"SUPERLINK_SAN=\"{'IP' if re.fullmatch(r'[0-9.:]+', host) else 'DNS'}:{host}\" "
                          f"deploy/make_certs.sh {cfg.cert.parent} SITE... (the CA and the site keys are kept)")