//! `--cleanup` against real rules: removes kube-proxy's chains and jumps,
//! keeps kubelet's and everything foreign, and is idempotent.

use kproxy_iptables::cleanup::cleanup;
use kproxy_iptables::runner::{parse_save_tables, Backend, Iptables};
use kproxy_model::IpFamily;
use kproxy_testkit::netns::{skip_unless_root, Netns};

/// What kube-proxy's iptables mode leaves behind, plus kubelet's chains and
/// foreign rules.
const INSTALLED: &str = "*mangle
:KUBE-PROXY-CANARY - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
COMMIT
*filter
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-FIREWALL - [0:0]
:FOREIGN-FILTER - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A FORWARD -j FOREIGN-FILTER
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FIREWALL -m mark --mark 0x8000/0x8000 -j DROP
-A FOREIGN-FILTER -p tcp --dport 22 -j ACCEPT
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-SVC-ABCDEFGHIJKLMNOP - [0:0]
:KUBE-SEP-ABCDEFGHIJKLMNOP - [0:0]
:KUBE-EXT-ABCDEFGHIJKLMNOP - [0:0]
:KUBE-FW-ABCDEFGHIJKLMNOP - [0:0]
:KUBE-SVL-ABCDEFGHIJKLMNOP - [0:0]
:DOCKER - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A PREROUTING -p udp --dport 4789 -j RETURN
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A POSTROUTING -s 172.17.0.0/16 -j MASQUERADE
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 443 -j KUBE-SVC-ABCDEFGHIJKLMNOP
-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-NODEPORTS -p tcp -m tcp --dport 30080 -j KUBE-EXT-ABCDEFGHIJKLMNOP
-A KUBE-EXT-ABCDEFGHIJKLMNOP -j KUBE-MARK-MASQ
-A KUBE-EXT-ABCDEFGHIJKLMNOP -j KUBE-SVC-ABCDEFGHIJKLMNOP
-A KUBE-FW-ABCDEFGHIJKLMNOP -j KUBE-EXT-ABCDEFGHIJKLMNOP
-A KUBE-SVL-ABCDEFGHIJKLMNOP -j KUBE-SEP-ABCDEFGHIJKLMNOP
-A KUBE-SVC-ABCDEFGHIJKLMNOP -j KUBE-SEP-ABCDEFGHIJKLMNOP
-A KUBE-SEP-ABCDEFGHIJKLMNOP -s 10.244.1.10/32 -j KUBE-MARK-MASQ
-A KUBE-SEP-ABCDEFGHIJKLMNOP -p tcp -m tcp -j DNAT --to-destination 10.244.1.10:6443
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
COMMIT
";

#[test]
fn cleanup_removes_ours_and_keeps_foreign() {
    if skip_unless_root("cleanup_removes_ours_and_keeps_foreign") {
        return;
    }
    for backend in [Backend::Legacy, Backend::Nft] {
        let ns = Netns::create(&format!("clean-{backend}")).unwrap();
        let ipt = Iptables::new(IpFamily::V4, backend);
        ns.run_in(|| ipt.restore(INSTALLED)).unwrap().unwrap();

        let report = ns
            .run_in(|| cleanup(IpFamily::V4, backend))
            .unwrap()
            .unwrap();
        assert_eq!(report.rules_removed.len(), 8, "{backend}: {report:#?}");
        assert_eq!(report.chains_removed.len(), 17, "{backend}: {report:#?}");

        let save = ns.exec_ok([format!("iptables-{backend}-save")]).unwrap();
        let tables = parse_save_tables(&save);
        let all_chains: Vec<String> = tables
            .iter()
            .flat_map(|(t, s)| s.chains.keys().map(move |c| format!("{t}/{c}")))
            .collect();
        for (t, s) in &tables {
            for c in s.chains.keys() {
                let kube_proxy_chain =
                    c.starts_with("KUBE-") && c != "KUBE-KUBELET-CANARY" && c != "KUBE-FIREWALL";
                assert!(!kube_proxy_chain, "{backend}: {t}/{c} left: {all_chains:?}");
            }
        }
        assert!(tables["mangle"].chains.contains_key("KUBE-KUBELET-CANARY"));
        assert_eq!(
            tables["filter"].chains["KUBE-FIREWALL"],
            vec!["-m mark --mark 0x8000/0x8000 -j DROP"]
        );
        assert_eq!(
            tables["filter"].chains["INPUT"],
            vec!["-j KUBE-FIREWALL"],
            "{backend}"
        );
        assert_eq!(
            tables["filter"].chains["FORWARD"],
            vec!["-j FOREIGN-FILTER"]
        );
        assert!(tables["filter"].chains["OUTPUT"].is_empty());
        assert_eq!(
            tables["filter"].chains["FOREIGN-FILTER"],
            vec!["-p tcp -m tcp --dport 22 -j ACCEPT"]
        );
        assert_eq!(
            tables["nat"].chains["PREROUTING"],
            vec![
                "-p udp -m udp --dport 4789 -j RETURN",
                "-m addrtype --dst-type LOCAL -j DOCKER"
            ],
            "{backend}"
        );
        assert!(tables["nat"].chains["OUTPUT"].is_empty());
        assert_eq!(
            tables["nat"].chains["POSTROUTING"],
            vec!["-s 172.17.0.0/16 -j MASQUERADE"]
        );
        assert_eq!(tables["nat"].chains["DOCKER"], vec!["-i docker0 -j RETURN"]);

        // Idempotent: the second run finds nothing and changes nothing.
        let again = ns
            .run_in(|| cleanup(IpFamily::V4, backend))
            .unwrap()
            .unwrap();
        assert!(again.is_empty(), "{again:#?}");
        let save2 = ns.exec_ok([format!("iptables-{backend}-save")]).unwrap();
        let strip = |s: &str| {
            s.lines()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(strip(&save), strip(&save2));
    }
}

#[test]
fn cleanup_of_an_empty_namespace_is_a_no_op() {
    if skip_unless_root("cleanup_of_an_empty_namespace_is_a_no_op") {
        return;
    }
    let ns = Netns::create("clean-empty").unwrap();
    for family in IpFamily::ALL {
        let report = ns
            .run_in(|| cleanup(family, Backend::Nft))
            .unwrap()
            .unwrap();
        assert!(report.is_empty(), "{report:#?}");
    }
}
