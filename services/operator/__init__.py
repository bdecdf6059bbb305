"""Operator tools behind the ``stagemesh`` command (services/cli/), apart from the stage
runtime: processes started and supervised as one mesh (``launcher``, ``mesh_start``), the
embedded etcd (``etcd_server``) and the development CA (``certs``). No stage imports them;
the tests and benchmarks use them to start meshes as ``stagemesh up`` does."""
