"""nsqadmin as rendered with ``nsq.admin_users``: privileged actions only for the user the proxy names."""
from __future__ import annotations

import json
import shlex
import urllib.error
import urllib.request

import pytest
import yaml

from pipeline.client import nsqd_http
from pipeline.ops.install import bin_dir
from pipeline.ops.processes import free_port, start_process
from pipeline.ops.supervisor_conf import render
from pipeline.config import load_topology

LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def pause(admin: str, topic: str, user: str | None) -> int:
    request = urllib.request.Request(f"http://{admin}/api/topics/{topic}", data=json.dumps({"action": "pause"}).encode(),
                                     method="POST", headers={"X-Auth-User": user} if user else {})
    try:
        with LOCAL.open(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.integration
def test_only_the_named_admin_may_pause_a_topic(nsq_cluster, tmp_path, topic):
    admin = f"127.0.0.1:{free_port()}"
    nsq = {"nsqd": [{"name": "n0", "tcp": nsq_cluster.nsqd.tcp, "http": nsq_cluster.nsqd.http}],
           "lookupd": [{"tcp": nsq_cluster.lookupd.tcp, "http": nsq_cluster.lookupd.http}],
           "admin": admin, "admin_users": ["alice"], "admin_acl_header": "X-Auth-User", "var_dir": str(tmp_path)}
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump({"nsq": nsq}))
    # the nsqadmin command exactly as supervisord would run it
    line = next(l for l in render(load_topology(path)).splitlines() if l.startswith("command=") and "nsqadmin" in l)
    argv = shlex.split(line.removeprefix("command=").replace("%(ENV_NSQ_PIPELINE_BIN)s", str(bin_dir())))
    assert argv[-2:] == ["--acl-http-header=X-Auth-User", "--admin-user=alice"]
    nsqd_http.create_topic(nsq_cluster.nsqd.http, topic)
    process = start_process("nsqadmin", argv, http=admin, log_path=tmp_path / "nsqadmin.log")
    try:
        assert pause(admin, topic, None) == 403
        assert pause(admin, topic, "mallory") == 403
        assert nsqd_http.stats(nsq_cluster.nsqd.http, topic)["topics"][0]["paused"] is False
        assert pause(admin, topic, "alice") == 200
        assert nsqd_http.stats(nsq_cluster.nsqd.http, topic)["topics"][0]["paused"] is True
    finally:
        process.stop()
