"""The site: a Flower ClientApp. Everything that touches private data runs behind these handlers.

| message type            | what the site does                                         | what it sends back (common.protocol) |
|-------------------------|------------------------------------------------------------|--------------------------------------|
| ``query.info``          | reads its published schema and policy                      | image shape, class names, policy     |
| ``train.gan``           | DP-SGD on its discriminator, trains the generator          | generator, noisy weight, G loss      |
| ``train.bnnet``         | DP-SGD on the shared GroupNorm net                         | net, noisy weight                    |
| ``query.bnstats``       | DP class-wise statistics of the net's norm inputs          | noisy counts, sums, sums of squares  |
| ``evaluate.classifier`` | if allowed: scores the classifier on its held-out data     | noisy (K, 2) right/wrong counts      |
| ``query.audit``         | if allowed: distances of its records to a synthetic sample | noisy distance histograms            |
| ``train`` (SecAgg+)     | one of the three releases above it, added to a secure sum  | masked vector, keys, shares only     |

Every reply is a class of ``common.protocol`` whose fields are each declared public or a charged DP
release; every DP release is charged in the site's ledger before the work; every failure becomes a
refusal that is safe to send (``client.requests.site_handler``).
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from client.bn_site import handle_bnstats, handle_train_bnnet
from client.evaluation import handle_audit, handle_evaluation
from client.gan_site import handle_train_gan
from client.secure_site import handle_secure_train, refusals_mod, secagg_settings_mod
from client.requests import site_data, site_device, site_handler
from client.site import SiteSettings
from common import protocol as P

log = logging.getLogger("fedsynth.site")
app = ClientApp()


@site_handler
def handle_info(msg: Message, context: Context, site: SiteSettings) -> Message:
    """The site's published data schema and query policy: no records, no counts."""
    P.InfoRequest.from_message(msg)
    data = site_data(site)
    c, h, w = data.image_shape
    return P.InfoReply(site_name=site.name, channels=c, height=h, width=w, classes=tuple(data.classes),
                       delta_bound=site.delta_bound, modes=tuple(site.modes),
                       evaluation=site.evaluation and bool(site.heldout), audits=site.audits and bool(site.heldout),
                       queries_per_run=site.queries_per_run,
                       device=site_device(context).type,
                       sensitive_attribute=site.sensitive_attribute).as_reply(msg)


app.query("info")(handle_info)
app.train("gan")(handle_train_gan)
app.train("bnnet")(handle_train_bnnet)
app.query("bnstats")(handle_bnstats)
app.evaluate("classifier")(handle_evaluation)
app.query("audit")(handle_audit)
# Secure aggregation: Flower's SecAgg+ mod runs its four stages on "train"; our mod outside it returns refusals.
app.train(mods=[refusals_mod, secagg_settings_mod, secaggplus_mod])(handle_secure_train)
