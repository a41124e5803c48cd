import subprocess, signal, time, os
import e2e_helpers
import test_e2e_phone as P

world = P.world

def test_scratch(world):
    for i in range(4):
        conf = world.workdir / f"c{i}"
        conf.mkdir()
        log = world.workdir / f"plain{i}.log"
        argv = [str(e2e_helpers.MITMDUMP), "--mode", "regular@127.0.0.1:0", "--mode", "dns@127.0.0.1:5353", "--mode", f"wireguard@{world.mitm_address}:{P.WG_PORT}", "--set", f"confdir={conf}", "-s", "addons/mitm_wg.py", "--set", f"wg_conf={world.conf}"] + os.environ.get("XTRA", "").split()
        with log.open("wb") as out:
            proc = world.client_ns.popen(argv, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONFAULTHANDLER="1"))
        e2e_helpers.wait_for(lambda: "is up" in log.read_text(), 20, "conf")
        text = P._CONF_BLOCK.search(log.read_text()).group(1)
        with P.netns_resolv_conf(world.phone_ns, "nameserver 10.0.0.53\n"), P.wireguard_go_interface(world.phone_ns, f"mwgph{world.exit.index}s{i}", text, world.workdir):
            try:
                if os.environ.get("Q"):
                    P.dns_query(world.phone_ns, "x.test", "A", server="10.0.0.53")
            except Exception as e:
                print("query", e)
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
        print("RESULT", i, proc.returncode, "Fatal" in log.read_text())
