"""Configuration files of the lab's non-GLB services: NSD (the parent zones) and unbound.

The DNS hierarchy the resolver walks, all inside the lab:

    .            NSD on 172.16.0.30 ("ns.lab."), unbound's root hint
    net.         NSD on 172.16.0.30, delegated from the root
    example.net. dnsfront ns1 172.16.0.53 and ns2 172.16.0.54: NS + glue in net.

So unbound primes the root, follows the referral to net., then to
example.net., and asks dnsfront: a real delegation, as on the Internet.
"""

from __future__ import annotations

from pathlib import Path

from deploy.lab import topology as topo

PARENT_NAME = "ns.lab."


def root_zone() -> str:
    return f"""$ORIGIN .
$TTL 86400
.           IN SOA {PARENT_NAME} hostmaster.lab. 1 3600 900 604800 300
.           IN NS  {PARENT_NAME}
{PARENT_NAME} IN A {topo.PARENT}
net.        IN NS  {PARENT_NAME}
"""


def net_zone() -> str:
    glue = "".join(f"{role}.{topo.ZONE}.  IN A  {addr}\n" for role, addr in topo.DNSFRONTS.items())
    ns = "".join(f"{topo.ZONE}.  IN NS  {role}.{topo.ZONE}.\n" for role in topo.DNSFRONTS)
    return f"""$ORIGIN net.
$TTL 86400
net.        IN SOA {PARENT_NAME} hostmaster.lab. 1 3600 900 604800 300
net.        IN NS  {PARENT_NAME}
; the delegation of {topo.ZONE} to dnsfront, with glue
{ns}{glue}"""


def nsd_conf(etc: Path, run: Path) -> str:
    return f"""server:
  ip-address: {topo.PARENT}
  port: 53
  do-ip6: no
  server-count: 1
  username: ""
  chroot: ""
  zonesdir: "{etc}"
  database: ""
  zonelistfile: "{run}/nsd.zonelist"
  xfrdfile: "{run}/nsd.xfrd.state"
  pidfile: "{run}/nsd.pid"
  logfile: "{run}/logs/nsd.log"
  verbosity: 1
  hide-version: yes
remote-control:
  control-enable: no
zone:
  name: "."
  zonefile: "root.zone"
zone:
  name: "net."
  zonefile: "net.zone"
"""


def root_hints() -> str:
    return f""".            3600000  NS  {PARENT_NAME}
{PARENT_NAME}      3600000  A   {topo.PARENT}
"""


def unbound_conf(etc: Path, run: Path) -> str:
    return f"""server:
  interface: {topo.RESOLVER}
  port: 53
  access-control: 172.16.0.0/24 allow
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "{run}"
  pidfile: "{run}/unbound.pid"
  use-syslog: no
  logfile: "{run}/logs/unbound.log"
  verbosity: 1
  do-ip6: no
  root-hints: "{etc}/root.hints"
  # no DNSSEC in the lab (the zones are not signed): iterate only
  module-config: "iterator"
  prefetch: no
  rrset-roundrobin: yes   # as most resolvers: the order of an answer is not a priority
  serve-expired: no
  # every server it asks is a lab address (root hint -> NSD -> dnsfront); no private-address
  # filtering, so answers with the lab's addresses are accepted
remote-control:
  control-enable: no
"""


def write_all(etc: Path, run: Path) -> dict[str, Path]:
    """Write every file; returns the paths of the two main configs."""
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "root.zone").write_text(root_zone())
    (etc / "net.zone").write_text(net_zone())
    (etc / "root.hints").write_text(root_hints())
    nsd = etc / "nsd.conf"
    nsd.write_text(nsd_conf(etc, run))
    unbound = etc / "unbound.conf"
    unbound.write_text(unbound_conf(etc, run))
    return {"nsd": nsd, "unbound": unbound}
