-- A state database of schema version 1, written by virtletd at commit b09125b (StateStore, SandboxRecord
-- and PodNetworkInfo of that version) and dumped with sqlite3's iterdump.  tests/unit/test_store_migration.py
-- loads it and opens it with the current StateStore.  Do not edit: it is what an old virtletd left on a node.
BEGIN TRANSACTION;
CREATE TABLE containers (
        id TEXT PRIMARY KEY, sandbox_id TEXT NOT NULL, name TEXT NOT NULL, attempt INTEGER NOT NULL,
        state TEXT NOT NULL, created_at INTEGER NOT NULL, started_at INTEGER NOT NULL DEFAULT 0,
        finished_at INTEGER NOT NULL DEFAULT 0, exit_code INTEGER NOT NULL DEFAULT 0,
        reason TEXT NOT NULL DEFAULT '', message TEXT NOT NULL DEFAULT '', image TEXT NOT NULL,
        image_ref TEXT NOT NULL, log_path TEXT NOT NULL, labels TEXT NOT NULL, annotations TEXT NOT NULL,
        config BLOB NOT NULL, extra TEXT NOT NULL DEFAULT '{}'
    );
INSERT INTO "containers" VALUES('11111111-1111-1111-1111-111111111111','aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa','vm',0,'RUNNING',1100,1200,0,0,'','','localhost/cirros.qcow2','sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc','vm/0.log','{"c": "1"}','{"ca": "x"}',X'0A040A02766D','{"creating": false, "dir": "/var/lib/virtlet/containers/1111", "domain": "virtlet-11111111-vm"}');
INSERT INTO "containers" VALUES('22222222-2222-2222-2222-222222222222','bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb','vm',2,'EXITED',2100,2200,2300,3,'Error','guest powered off','localhost/cirros.qcow2','sha256:dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd','vm/2.log','{}','{}',X'','{}');
CREATE TABLE sandboxes (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, namespace TEXT NOT NULL, uid TEXT NOT NULL,
        attempt INTEGER NOT NULL, state TEXT NOT NULL, created_at INTEGER NOT NULL,
        runtime_handler TEXT NOT NULL, netns TEXT NOT NULL, labels TEXT NOT NULL, annotations TEXT NOT NULL,
        config BLOB NOT NULL, network TEXT NOT NULL DEFAULT '{}', network_torn_down INTEGER NOT NULL DEFAULT 0
    );
INSERT INTO "sandboxes" VALUES('aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa','web','default','uid-web',1,'READY',1000,'virtlet','/var/run/netns/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa','{"app": "web"}','{"a": "b"}',X'0A190A0377656212077569642D7765621A0764656661756C74200112087765622D686F73741A212F7661722F6C6F672F706F64732F64656661756C745F7765625F7569642D776562221F0A0A31302E39362E302E313012117376632E636C75737465722E6C6F63616C2A05101618AE11320A0A0361707012037765623A060A0161120162','{"dhcp_pid": 4242, "dns_options": ["ndots:5"], "dns_searches": ["svc.cluster.local"], "dns_servers": ["10.96.0.10"], "hostname": "web-host", "netns_path": "/var/run/netns/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "nics": [{"bridge": "vmbr0", "gateway": "10.244.1.1", "index": 0, "ip": "10.244.1.5", "ipv6": ["fd00::5/64"], "mac": "0a:58:0a:f4:01:05", "mtu": 1450, "prefix": 24, "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}], "tap": "vtaaaaaaaaaaa0", "veth": "eth0"}], "pod_ips": ["10.244.1.5", "fd00::5"], "sandbox_id": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}',0);
INSERT INTO "sandboxes" VALUES('bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb','db','default','uid-db',1,'NOTREADY',2000,'virtlet','/var/run/netns/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb','{"app": "db"}','{"a": "b"}',X'0A170A02646212067569642D64621A0764656661756C7420011A1F2F7661722F6C6F672F706F64732F64656661756C745F64625F7569642D6462221F0A0A31302E39362E302E313012117376632E636C75737465722E6C6F63616C2A05101618AE1132090A03617070120264623A060A0161120162','{"dhcp_pid": 4242, "dns_options": ["ndots:5"], "dns_searches": ["svc.cluster.local"], "dns_servers": ["10.96.0.10"], "hostname": "db", "netns_path": "/var/run/netns/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", "nics": [{"bridge": "vmbr0", "gateway": "10.244.1.1", "index": 0, "ip": "10.244.1.6", "ipv6": [], "mac": "0a:58:0a:f4:01:05", "mtu": 1450, "prefix": 24, "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}], "tap": "vtbbbbbbbbbbb0", "veth": "eth0"}], "pod_ips": ["10.244.1.6"], "sandbox_id": "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"}',1);
INSERT INTO "sandboxes" VALUES('cccccccccccccccccccccccccccccccc','plain','default','uid-plain',1,'READY',3000,'virtlet','/var/run/netns/cccccccccccccccccccccccccccccccc','{"app": "plain"}','{"a": "b"}',X'','{}',0);
INSERT INTO "sandboxes" VALUES('dddddddddddddddddddddddddddddddd','half','default','uid-half',1,'CREATING',4000,'virtlet','/var/run/netns/dddddddddddddddddddddddddddddddd','{"app": "half"}','{"a": "b"}',X'0A1B0A0468616C6612087569642D68616C661A0764656661756C742001120968616C662D686F73741A122F7661722F6C6F672F706F64732F68616C66221F0A0A31302E39362E302E313012117376632E636C75737465722E6C6F63616C2A05101618AE11320B0A03617070120468616C663A060A0161120162','{}',0);
CREATE INDEX containers_by_sandbox ON containers (sandbox_id);
COMMIT;
