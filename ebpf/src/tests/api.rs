//! The pure parts of the API: keys, normalisation, configuration.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::{AttachMode, Error, KeyBytes, abi, allow_key, source_prefix, src_key, syn_config};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

#[test]
fn source_units_are_ipv4_addresses_and_ipv6_64s() {
    assert_eq!(source_prefix(ip("192.0.2.7")), net("192.0.2.7/32"));
    assert_eq!(
        source_prefix(ip("2001:db8:1:2:3:4:5:6")),
        net("2001:db8:1:2::/64")
    );
    assert_eq!(source_prefix(ip("::ffff:192.0.2.7")), net("192.0.2.7/32"));
    assert_eq!(
        src_key(ip("192.0.2.7")).addr,
        ip("::ffff:192.0.2.7")
            .to_string()
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets()
    );
    assert_eq!(
        src_key(ip("2001:db8:1:2:3:4:5:6")),
        src_key(ip("2001:db8:1:2::ffff"))
    );
    assert_ne!(
        src_key(ip("2001:db8:1:2::1")),
        src_key(ip("2001:db8:1:3::1"))
    );
    // An IPv4 key never equals an IPv6 /64 key: the mapped form has low bits.
    assert_ne!(src_key(ip("0.0.0.0")), src_key(ip("::")));
}

#[test]
fn allow_keys_carry_port_family_and_prefix() {
    let KeyBytes(len, d) = allow_key(10007, &net("203.0.113.77/24"));
    assert_eq!(len, abi::ALLOW_KEY_FIXED_BITS + 24);
    assert_eq!((d.port, d.family, d.reserved), (10007, abi::FAMILY_IPV4, 0));
    assert_eq!(&d.addr[..4], &[203, 0, 113, 0], "host bits cleared");
    assert!(d.addr[4..].iter().all(|&b| b == 0));

    let KeyBytes(len, d) = allow_key(1, &net("2001:db8::1/48"));
    assert_eq!(len, abi::ALLOW_KEY_FIXED_BITS + 48);
    assert_eq!(d.family, abi::FAMILY_IPV6);
    assert_eq!(
        d.addr,
        ip("2001:db8::")
            .to_string()
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets()
    );

    // IPv4-mapped IPv6 networks are IPv4 on the wire.
    assert_eq!(
        allow_key(5, &net("::ffff:10.3.0.0/112")),
        allow_key(5, &net("10.3.0.0/16"))
    );
    // ::/0 stays IPv6: it does not admit IPv4.
    assert_eq!(allow_key(5, &net("::/0")).1.family, abi::FAMILY_IPV6);
}

#[test]
fn syn_config_is_a_gcra_interval_and_tolerance() {
    let c = syn_config(10, 5).unwrap();
    assert_eq!(c.syn_interval_ns, 100_000_000);
    assert_eq!(c.syn_tolerance_ns, 400_000_000);
    assert_eq!(
        syn_config(0, 0).unwrap().syn_interval_ns,
        0,
        "rate 0 disables"
    );
    assert!(matches!(syn_config(5, 0), Err(Error::InvalidConfig(_))));
    assert_eq!(syn_config(u32::MAX, 1).unwrap().syn_interval_ns, 1);
}

#[test]
fn attach_modes_parse_from_config_spelling() {
    for m in [AttachMode::Xdp, AttachMode::XdpGeneric, AttachMode::Tc] {
        assert_eq!(m.as_str().parse::<AttachMode>().unwrap(), m);
    }
    assert!(matches!(
        "XDP".parse::<AttachMode>(),
        Err(Error::InvalidConfig(_))
    ));
}

#[test]
fn eperm_anywhere_in_the_chain_means_no_privileges() {
    let e = Error::kernel("loading", std::io::Error::from_raw_os_error(1));
    assert!(matches!(e, Error::NoPrivileges(_)), "{e:?}");
    let e = Error::kernel("loading", std::io::Error::from_raw_os_error(22));
    assert!(matches!(e, Error::Kernel { .. }), "{e:?}");
}

#[test]
fn enforcer_is_send() {
    fn send<T: Send>() {}
    send::<crate::Enforcer>();
    send::<Error>();
}
