use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chitin_virtio::test_utils::RecordingInterrupt;
use chitin_virtio::{ActivateContext, VirtioDevice};
use event_manager::{EventManager, SubscriberOps};

use crate::backend::port_path;
use crate::device::{Vsock, VsockConfig};
use crate::packet::{Header, Op, HOST_CID};
use crate::test_utils::{Guest, TempDir, GUEST_CID};

struct Setup {
    _dir: TempDir,
    uds: std::path::PathBuf,
    vsock: Arc<Mutex<Vsock>>,
    manager: EventManager<Arc<Mutex<Vsock>>>,
    guest: Guest,
}

fn setup() -> Setup {
    let dir = TempDir::new();
    let uds = dir.path().join("v.sock");
    let vsock = Arc::new(Mutex::new(
        Vsock::new(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: uds.clone(),
        })
        .unwrap(),
    ));
    let mut manager = EventManager::<Arc<Mutex<Vsock>>>::new().unwrap();
    manager.add_subscriber(vsock.clone());
    let mut guest = Guest::new();
    guest.post_rx(64);
    vsock
        .lock()
        .unwrap()
        .activate(ActivateContext {
            mem: guest.mem.clone(),
            queues: guest.queues(),
            interrupt: Arc::new(RecordingInterrupt::new()),
            acked_features: 0,
        })
        .unwrap();
    Setup {
        _dir: dir,
        uds,
        vsock,
        manager,
        guest,
    }
}

impl Setup {
    fn notify_tx(&self) {
        self.vsock.lock().unwrap().queue_events()[crate::TX_QUEUE]
            .write(1)
            .unwrap();
    }

    /// Run the loop until the guest received `count` packets.
    fn wait_packets(&mut self, count: usize) -> Vec<(Header, Vec<u8>)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = Vec::new();
        while got.len() < count {
            assert!(Instant::now() < deadline, "only {got:?} arrived");
            self.manager.run_with_timeout(20).unwrap();
            got.extend(self.guest.received());
        }
        got
    }

    fn spin(&mut self, times: usize) {
        for _ in 0..times {
            self.manager.run_with_timeout(5).unwrap();
        }
    }
}

#[test]
fn event_host_connect_relays_both_ways() {
    let mut s = setup();
    s.spin(3);
    let mut host = UnixStream::connect(&s.uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(b"CONNECT 1234\n").unwrap();

    let got = s.wait_packets(1);
    let request = got[0].0;
    assert_eq!(request.op, Op::Request as u16);
    assert_eq!((request.src_cid, request.dst_port), (HOST_CID, 1234));

    let mut response = s.guest.header(1234, request.src_port, Op::Response);
    response.buf_alloc = 65536;
    s.guest.send(response, &[]);
    s.notify_tx();
    s.spin(3);
    let mut line = [0u8; 32];
    let n = host.read(&mut line).unwrap();
    assert_eq!(&line[..n], format!("OK {}\n", request.src_port).as_bytes());

    host.write_all(b"from host").unwrap();
    let got = s.wait_packets(1);
    assert_eq!(got[0].0.op, Op::Rw as u16);
    assert_eq!(got[0].1, b"from host");

    let mut rw = s.guest.header(1234, request.src_port, Op::Rw);
    rw.len = 10;
    s.guest.send(rw, b"from guest");
    s.notify_tx();
    s.spin(3);
    let mut buf = [0u8; 10];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"from guest");

    // Host hangs up: the guest hears SHUTDOWN.
    drop(host);
    let got = s.wait_packets(1);
    assert_eq!(got[0].0.op, Op::Shutdown as u16);
}

#[test]
fn event_guest_connect_reaches_port_socket() {
    let mut s = setup();
    let listener = UnixListener::bind(port_path(&s.uds, 5000)).unwrap();
    s.guest.send(s.guest.header(777, 5000, Op::Request), &[]);
    s.notify_tx();
    let got = s.wait_packets(1);
    assert_eq!(got[0].0.op, Op::Response as u16);
    let (mut server, _) = listener.accept().unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();

    let mut rw = s.guest.header(777, 5000, Op::Rw);
    rw.len = 5;
    s.guest.send(rw, b"hello");
    s.notify_tx();
    s.spin(3);
    let mut buf = [0u8; 5];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");

    server.write_all(b"world").unwrap();
    let got = s.wait_packets(1);
    assert_eq!(got[0].1, b"world");
}

#[test]
fn event_guest_connect_refused_port_gets_rst() {
    let mut s = setup();
    s.guest.send(s.guest.header(777, 6000, Op::Request), &[]);
    s.notify_tx();
    let got = s.wait_packets(1);
    assert_eq!(got[0].0.op, Op::Rst as u16);
    assert_eq!(s.vsock.lock().unwrap().connection_count(), 0);
}

#[test]
fn event_reset_clears_connections_and_closes_streams() {
    let mut s = setup();
    let _listener = UnixListener::bind(port_path(&s.uds, 5000)).unwrap();
    s.guest.send(s.guest.header(777, 5000, Op::Request), &[]);
    s.notify_tx();
    s.wait_packets(1);
    let mut host = UnixStream::connect(&s.uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(b"CONNECT 1\n").unwrap();
    s.wait_packets(1);
    assert_eq!(s.vsock.lock().unwrap().connection_count(), 2);

    s.vsock.lock().unwrap().reset();
    s.spin(3);
    assert_eq!(s.vsock.lock().unwrap().connection_count(), 0);
    let mut buf = [0u8; 4];
    assert_eq!(host.read(&mut buf).unwrap(), 0);

    // The listener still accepts after a reset.
    let _again = UnixStream::connect(&s.uds).unwrap();
    s.spin(3);
}
