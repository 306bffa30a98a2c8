//! Version negotiation: the walk newest → oldest, INITIATE_CONTACT bytes, connection ids,
//! post failures.

use super::*;

fn config() -> ClientConfig {
    ClientConfig {
        target_vcpu: 3,
        interrupt_page: 0x1234_5000,
        monitor_pages: Some((0xAA000, 0xBB000)),
        ..ClientConfig::default()
    }
}

/// Checks one INITIATE_CONTACT post byte by byte (reference §3.3 layout, Linux
/// `vmbus_negotiate_version`).
fn check_initiate_contact(p: &Post, version: Version, cfg: &ClientConfig) {
    let b = p.msg.as_bytes();
    let want_conn = if version >= Version::Win10V5 { 4 } else { 1 };
    assert_eq!(p.connection_id, want_conn, "conn id for {version}");
    assert_eq!(b.len(), 0x28, "INITIATE_CONTACT length");
    assert_eq!(u32_at(b, 0x00), 14, "msgtype");
    assert_eq!(u32_at(b, 0x04), 0, "padding");
    assert_eq!(u32_at(b, 0x08), version.raw(), "version");
    assert_eq!(u32_at(b, 0x0C), cfg.target_vcpu, "target_vcpu");
    if version >= Version::Win10V5 {
        assert_eq!(b[0x10], 2, "msg_sint");
        assert_eq!(b[0x11], 0, "msg_vtl");
        assert_eq!(&b[0x12..0x18], &[0u8; 6], "reserved + feature flags");
    } else {
        assert_eq!(u64_at(b, 0x10), cfg.interrupt_page, "interrupt page");
    }
    let (m1, m2) = cfg.monitor_pages.unwrap_or((0, 0));
    assert_eq!(u64_at(b, 0x18), m1, "monitor page 1");
    assert_eq!(u64_at(b, 0x20), m2, "monitor page 2");
}

#[test]
fn walk_from_5_3_down_to_3_0_with_refusals() {
    let cfg = config();
    let mut c = Client::new(cfg.clone());
    assert_eq!(c.connection_state(), ConnectionState::Disconnected);
    c.connect().unwrap();
    let walk = [
        Version::Win10V5_3,
        Version::Win10V5_2,
        Version::Win10V5_1,
        Version::Win10V5,
        Version::Win10V4_1,
        Version::Win10,
        Version::Win8_1,
    ];
    for (i, v) in walk.iter().enumerate() {
        let p = posts(&mut c);
        assert_eq!(p.len(), 1, "one INITIATE_CONTACT at a time");
        check_initiate_contact(&p[0], *v, &cfg);
        assert_eq!(
            c.connection_state(),
            ConnectionState::Connecting {
                index: i,
                retries: 0
            }
        );
        assert_eq!(c.version(), None);
        if *v == Version::Win8_1 {
            // Below 5.0 the response's msg_conn_id is ignored (OpenVMM puts the version there).
            c.handle_message(&version_response(true, Version::Win8_1.raw()))
                .unwrap();
        } else {
            c.handle_message(&version_response(false, 0)).unwrap();
        }
        if *v != Version::Win8_1 {
            assert!(events(&mut c).is_empty(), "a refusal is not an event");
        }
    }
    assert_eq!(
        events(&mut c),
        [ClientEvent::Connected {
            version: Version::Win8_1,
            msg_conn_id: 1
        }]
    );
    assert_eq!(c.version(), Some(Version::Win8_1));
    assert_eq!(c.msg_conn_id(), Some(1));
    c.request_offers().unwrap();
    let m = one_post(&mut c, 1);
    assert_eq!(m.as_bytes(), &[3, 0, 0, 0, 0, 0, 0, 0]);
    c.check_invariants().unwrap();
}

#[test]
fn from_5_0_later_messages_use_the_response_connection_id() {
    let mut c = Client::new(ClientConfig::default());
    c.connect().unwrap();
    let p = posts(&mut c);
    check_initiate_contact(&p[0], Version::Win10V5_3, &ClientConfig::default());
    c.handle_message(&version_response(true, 0x1234)).unwrap();
    assert_eq!(
        events(&mut c),
        [ClientEvent::Connected {
            version: Version::Win10V5_3,
            msg_conn_id: 0x1234
        }]
    );
    c.request_offers().unwrap();
    one_post(&mut c, 0x1234);
    // Only once per connection.
    assert_eq!(
        refused(&mut c, |c| c.request_offers()),
        ClientError::OffersAlreadyRequested
    );
}

#[test]
fn all_refused_reports_connect_failed_and_allows_a_new_attempt() {
    let mut c = Client::new(ClientConfig::default());
    c.connect().unwrap();
    for v in Version::LINUX_NEGOTIATION_ORDER {
        let p = posts(&mut c);
        assert_eq!(p.len(), 1);
        assert_eq!(u32_at(&p[0].msg, 8), v.raw());
        c.handle_message(&version_response(false, 0)).unwrap();
    }
    assert!(posts(&mut c).is_empty());
    assert_eq!(events(&mut c), [ClientEvent::ConnectFailed]);
    assert_eq!(c.connection_state(), ConnectionState::Disconnected);
    // A late response is refused.
    refused(&mut c, |c| c.handle_message(&version_response(true, 4)));
    c.connect().unwrap();
    assert_eq!(u32_at(&posts(&mut c)[0].msg, 8), Version::Win10V5_3.raw());
}

#[test]
fn invalid_connection_id_moves_to_the_next_version() {
    // A host without connection id 4: every 5.x INITIATE_CONTACT post fails.
    let cfg = config();
    let mut c = Client::new(cfg.clone());
    c.connect().unwrap();
    for v in [
        Version::Win10V5_3,
        Version::Win10V5_2,
        Version::Win10V5_1,
        Version::Win10V5,
    ] {
        let p = posts(&mut c);
        assert_eq!(p.len(), 1);
        check_initiate_contact(&p[0], v, &cfg);
        c.post_failed(hv_status::INVALID_CONNECTION_ID).unwrap();
    }
    let p = posts(&mut c);
    assert_eq!(p.len(), 1);
    check_initiate_contact(&p[0], Version::Win10V4_1, &cfg);
    c.handle_message(&version_response(true, 9)).unwrap();
    assert_eq!(
        events(&mut c),
        [ClientEvent::Connected {
            version: Version::Win10V4_1,
            msg_conn_id: 1
        }]
    );
    // Connected: post_failed is no longer about INITIATE_CONTACT.
    assert!(matches!(
        refused(&mut c, |c| c.post_failed(hv_status::INVALID_CONNECTION_ID)),
        ClientError::WrongState {
            op: "post_failed",
            ..
        }
    ));
}

#[test]
fn post_failure_before_the_post_was_taken_replaces_it() {
    let mut c = Client::new(ClientConfig::default());
    c.connect().unwrap();
    c.post_failed(hv_status::INVALID_CONNECTION_ID).unwrap();
    let p = posts(&mut c);
    assert_eq!(p.len(), 1, "the stale INITIATE_CONTACT is dropped");
    assert_eq!(u32_at(&p[0].msg, 8), Version::Win10V5_2.raw());
}

#[test]
fn transient_post_failures_retry_the_same_version_then_move_on() {
    let mut c = Client::new(ClientConfig::default());
    c.connect().unwrap();
    posts(&mut c);
    for i in 0..POST_RETRY_LIMIT {
        let status = if i % 2 == 0 {
            hv_status::INSUFFICIENT_BUFFERS
        } else {
            hv_status::INSUFFICIENT_MEMORY
        };
        c.post_failed(status).unwrap();
        let p = posts(&mut c);
        assert_eq!(p.len(), 1);
        assert_eq!(u32_at(&p[0].msg, 8), Version::Win10V5_3.raw(), "retry {i}");
    }
    c.post_failed(hv_status::INSUFFICIENT_BUFFERS).unwrap();
    assert_eq!(u32_at(&posts(&mut c)[0].msg, 8), Version::Win10V5_2.raw());
    assert_eq!(
        refused(&mut c, |c| c.post_failed(hv_status::SUCCESS)),
        ClientError::NotAFailure { status: 0 }
    );
}

#[test]
fn post_failures_can_exhaust_every_version() {
    let mut c = Client::new(ClientConfig {
        versions: alloc::vec![Version::Win10V5_3, Version::Win8_1],
        ..ClientConfig::default()
    });
    c.connect().unwrap();
    c.post_failed(hv_status::INVALID_CONNECTION_ID).unwrap();
    c.post_failed(0x0005).unwrap();
    assert!(posts(&mut c).is_empty());
    assert_eq!(events(&mut c), [ClientEvent::ConnectFailed]);
    assert_eq!(c.connection_state(), ConnectionState::Disconnected);
}

#[test]
fn connect_is_refused_when_not_disconnected_or_without_versions() {
    let mut c = Client::new(ClientConfig::default());
    c.connect().unwrap();
    assert!(matches!(
        refused(&mut c, |c| c.connect()),
        ClientError::WrongState {
            op: "connect",
            state: "connecting"
        }
    ));
    let mut c = connected(Version::Win10V5_2);
    refused(&mut c, |c| c.connect());
    // A second VERSION_RESPONSE while connected is refused.
    assert_eq!(
        refused(&mut c, |c| c.handle_message(&version_response(true, 5))),
        ClientError::UnexpectedMessage {
            msgtype: MessageType::VersionResponse,
            state: "connected"
        }
    );
    let mut c = Client::new(ClientConfig {
        versions: Vec::new(),
        ..ClientConfig::default()
    });
    assert_eq!(refused(&mut c, |c| c.connect()), ClientError::NoVersions);
}

#[test]
fn old_versions_fill_the_interrupt_page_and_use_connection_id_1() {
    let cfg = ClientConfig {
        versions: alloc::vec![Version::Win8],
        interrupt_page: 0x0102_0304_0506_0708,
        ..ClientConfig::default()
    };
    let mut c = Client::new(cfg.clone());
    c.connect().unwrap();
    let p = posts(&mut c);
    check_initiate_contact(&p[0], Version::Win8, &cfg);
    c.handle_message(&version_response(true, 4)).unwrap();
    assert_eq!(c.msg_conn_id(), Some(1));
    // 2.4 cannot unload (Linux: pre-WS2012R2 hosts don't support reconnect) or modify.
    assert_eq!(
        refused(&mut c, |c| c.unload()),
        ClientError::VersionTooOld {
            op: "unload",
            version: Version::Win8,
            required: Version::Win8_1
        }
    );
}

#[test]
fn ws2008_offers_signal_on_the_shared_event_connection() {
    let mut c = Client::new(ClientConfig {
        versions: alloc::vec![Version::Ws2008],
        ..ClientConfig::default()
    });
    c.connect().unwrap();
    c.handle_message(&version_response(true, 0)).unwrap();
    c.handle_message(&offer(5, class::SCSI, instance(5), 0))
        .unwrap();
    let o = c.offer(5).unwrap();
    assert_eq!(o.connection_id, EVENT_CONNECTION_ID);
    assert!(!o.dedicated_interrupt);
}
