"""The GLB lab: the whole deployment on one machine, in network namespaces.

    python -m deploy.lab up|down|status|demo|glb ...|exec ROLE CMD...

See ``python -m deploy.lab --help`` and docs/operations.md ("The lab").
Modules: ``topology`` (the network as data), ``net`` (ip/namespace helpers),
``services`` (NSD and unbound configs), ``lab`` (build, processes, teardown),
``probe`` (what a client does), ``httpd`` (the real servers' HTTP service),
``demo`` (the failover timeline).
"""
