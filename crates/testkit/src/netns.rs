//! Network namespaces, veth pairs and bridges for tests that send real traffic.
