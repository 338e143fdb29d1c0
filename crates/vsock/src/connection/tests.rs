use super::*;

fn credit_with_peer(buf_alloc: u32, fwd_cnt: u32) -> Credit {
    let mut credit = Credit::new(BUF_ALLOC);
    credit.update_peer(&Header {
        buf_alloc,
        fwd_cnt,
        ..Header::default()
    });
    credit
}

#[test]
fn credit_peer_free_subtracts_in_flight() {
    let mut credit = credit_with_peer(1000, 0);
    credit.record_sent(300);
    assert_eq!(credit.peer_free(), 700);
    credit.update_peer(&Header {
        buf_alloc: 1000,
        fwd_cnt: 300,
        ..Header::default()
    });
    assert_eq!(credit.peer_free(), 1000);
}

#[test]
fn credit_counters_wrap_around_u32() {
    let mut credit = credit_with_peer(1000, u32::MAX - 99);
    credit.tx_cnt = u32::MAX - 99;
    credit.record_sent(300);
    // tx_cnt wrapped to 200; in flight is still 300.
    assert_eq!(credit.tx_cnt, 200);
    assert_eq!(credit.peer_free(), 700);
}

#[test]
fn credit_peer_fwd_cnt_ahead_gives_no_credit() {
    let credit = credit_with_peer(1000, 5);
    // The guest claims to have consumed bytes never sent: in flight wraps
    // to almost 2^32, so no credit rather than a huge one.
    assert_eq!(credit.peer_free(), 0);
}

#[test]
fn credit_peer_shrinks_buffer_gives_no_credit() {
    let mut credit = credit_with_peer(1000, 0);
    credit.record_sent(800);
    credit.update_peer(&Header {
        buf_alloc: 500,
        fwd_cnt: 0,
        ..Header::default()
    });
    assert_eq!(credit.peer_free(), 0);
}

#[test]
fn credit_overflow_detected_across_wrap() {
    let mut credit = Credit::new(1000);
    credit.rx_cnt = u32::MAX - 10;
    credit.fwd_cnt = u32::MAX - 10;
    credit.record_received(900);
    assert_eq!(credit.unforwarded(), 900);
    assert!(!credit.would_overflow(100));
    assert!(credit.would_overflow(101));
    assert!(credit.would_overflow(u32::MAX));
}

#[test]
fn credit_update_needed_after_threshold_forwarded() {
    let mut credit = Credit::new(BUF_ALLOC);
    credit.record_forwarded(CREDIT_UPDATE_THRESHOLD - 1);
    assert!(!credit.needs_update());
    credit.record_forwarded(1);
    assert!(credit.needs_update());
    let mut header = Header::default();
    credit.stamp(&mut header);
    assert_eq!(header.fwd_cnt, CREDIT_UPDATE_THRESHOLD);
    assert_eq!(header.buf_alloc, BUF_ALLOC);
    assert!(!credit.needs_update());
}
