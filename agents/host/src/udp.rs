//! The agents' WireGuard socket: UDP with the kernel's batching, so that a bulk transfer
//! costs a few system calls per 64 KiB rather than one per datagram.
//!
//! - Reading ([`Udp::recv`]) takes up to [`RECV_SLOTS`] buffers per call (`recvmmsg`), and each
//!   may hold many datagrams from one sender that the kernel coalesced (UDP GRO);
//!   [`RecvBatch::datagrams`] splits them again.
//! - Writing ([`Udp::send`]) hands the kernel a run of equal-sized datagrams for one
//!   destination in one call (UDP GSO, `UDP_SEGMENT`); [`SendQueue`] groups what the core
//!   wants sent into such runs without changing its order.
//!
//! The system calls and their control messages are quinn-udp's; this module sizes the
//! socket's buffers, splits and groups, and keeps one refused datagram from stopping the rest.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;

/// Buffers of one read: each holds one datagram, or a coalesced run of them.
pub const RECV_SLOTS: usize = 16;

/// The most a coalesced run (and so one receive buffer, and one GSO send) can hold: the
/// largest UDP payload of an IPv4 packet.
const MAX_RUN_BYTES: usize = 65_507;

/// Linux refuses a GSO send of more segments than this (`UDP_MAX_SEGMENTS`).
const MAX_SEGMENTS: usize = 64;

/// The largest datagram that joins a GSO run, by the destination's family: what fits a
/// 1500-byte underlay (20 or 40 bytes of IP header, 8 of UDP). The kernel refuses a run whose
/// segments exceed the interface's MTU outright (where it would fragment a lone datagram), and
/// quinn-udp then turns GSO off for good; a larger datagram (a full packet wrapped for a
/// relay) is sent alone and fragmented as before.
const MAX_SEGMENT_V4: usize = 1500 - 20 - 8;
const MAX_SEGMENT_V6: usize = 1500 - 40 - 8;

/// What the socket's buffers are sized to in each direction. At the default (about 200 KiB) a
/// burst of coalesced segments overflows the receive buffer and the kernel drops datagrams
/// before the agent is even woken; this is what wireguard-go asks for.
const SOCKET_BUFFER_BYTES: usize = 7 << 20;

/// A UDP socket that reads and writes in batches. Reads and writes take `&self`.
#[derive(Debug)]
pub struct Udp {
    socket: tokio::net::UdpSocket,
    state: UdpSocketState,
}

impl Udp {
    /// Binds `address` and sizes the socket's buffers. Must run inside a tokio runtime.
    pub fn bind(address: SocketAddr) -> io::Result<Udp> {
        let socket = std::net::UdpSocket::bind(address)?;
        socket.set_nonblocking(true)?;
        let state = UdpSocketState::new((&socket).into())?;
        allow_fragments(&socket, address);
        size_buffers(&socket, &state);
        let socket = tokio::net::UdpSocket::from_std(socket)?;
        tracing::debug!(
            %address,
            gso_segments = state.max_gso_segments(),
            gro_segments = state.gro_segments(),
            "UDP socket bound"
        );
        Ok(Udp { socket, state })
    }

    /// Marks the socket so that a full tunnel never carries it ([`crate::full_tunnel::mark`]).
    pub fn mark(&self) -> io::Result<()> {
        crate::full_tunnel::mark(&self.socket)
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Waits for datagrams and reads as many as are there, up to what `batch` holds. An error
    /// (an ICMP error for an earlier send surfaces here) is the caller's to log; the next read
    /// may succeed.
    pub async fn recv(&self, batch: &mut RecvBatch) -> io::Result<()> {
        batch.filled = 0;
        loop {
            self.socket.readable().await?;
            let mut slices: [IoSliceMut<'_>; RECV_SLOTS] = {
                let mut buffers = batch.buffers.iter_mut();
                std::array::from_fn(|_| match buffers.next() {
                    Some(buffer) => IoSliceMut::new(buffer.as_mut_slice()),
                    None => IoSliceMut::new(&mut []),
                })
            };
            let read = self.socket.try_io(Interest::READABLE, || {
                self.state
                    .recv((&self.socket).into(), &mut slices, &mut batch.meta)
            });
            match read {
                Ok(count) => {
                    batch.filled = count;
                    return Ok(());
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => return Err(error),
            }
        }
    }

    /// Sends every run in `queue`, in order, and empties it. A run the kernel refuses is
    /// logged and the rest still go (UDP promises nothing; WireGuard and the protocols inside
    /// it recover). When the kernel turns out not to take GSO, the run goes again one datagram
    /// at a time and later runs are kept to one datagram.
    pub async fn send(&self, queue: &mut SendQueue) {
        queue.max_segments = self.max_segments();
        for index in 0..queue.used {
            let Some(run) = queue.runs.get(index) else {
                break;
            };
            let segment_size = (run.segments > 1).then_some(run.segment_size);
            let sent = self
                .send_one(run.destination, &run.bytes, segment_size)
                .await;
            if let Err(error) = sent {
                if segment_size.is_some() && self.max_segments() == 1 {
                    for datagram in run.bytes.chunks(run.segment_size.max(1)) {
                        if let Err(error) = self.send_one(run.destination, datagram, None).await {
                            tracing::debug!(%error, to = %run.destination, "UDP send failed");
                        }
                    }
                } else {
                    tracing::debug!(%error, to = %run.destination, "UDP send failed");
                }
            }
        }
        queue.used = 0;
    }

    async fn send_one(
        &self,
        destination: SocketAddr,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> io::Result<()> {
        let transmit = Transmit {
            destination,
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        };
        loop {
            self.socket.writable().await?;
            let sent = self.socket.try_io(Interest::WRITABLE, || {
                self.state.try_send((&self.socket).into(), &transmit)
            });
            match sent {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }

    fn max_segments(&self) -> usize {
        self.state.max_gso_segments().clamp(1, MAX_SEGMENTS)
    }
}

/// quinn-udp forbids IP fragmentation (it sizes its own datagrams to the path). Ours are
/// WireGuard's, sized to the TUN MTU, and one wrapped for a relay can exceed the underlay's MTU
/// by the relay's few bytes: as with a plain socket (and wireguard-go), the kernel fragments
/// those rather than dropping them. IPv4 only: quinn-udp's `IPV6_DONTFRAG` has no setter here,
/// so over IPv6 such a datagram is refused (logged), as ICMPv6 "packet too big" would refuse it.
fn allow_fragments(socket: &std::net::UdpSocket, address: SocketAddr) {
    use rustix::net::sockopt::{Ipv4PathMtuDiscovery, set_ip_mtu_discover};
    if address.is_ipv4()
        && let Err(error) = set_ip_mtu_discover(socket, Ipv4PathMtuDiscovery::WANT)
    {
        tracing::debug!(%error, "cannot allow fragments on the UDP socket");
    }
}

/// Asks for [`SOCKET_BUFFER_BYTES`] both ways: past the system's limit when the agent may
/// (`SO_RCVBUFFORCE` needs `CAP_NET_ADMIN`, which it has for its TUN device), else as much as
/// the limit allows. A smaller buffer is slower, never wrong, so a refusal is only logged.
fn size_buffers(socket: &std::net::UdpSocket, state: &UdpSocketState) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(socket, sockopt::RcvBufForce, &SOCKET_BUFFER_BYTES).is_err()
        && let Err(error) = state.set_recv_buffer_size(socket.into(), SOCKET_BUFFER_BYTES)
    {
        tracing::debug!(%error, "cannot size the UDP receive buffer");
    }
    if setsockopt(socket, sockopt::SndBufForce, &SOCKET_BUFFER_BYTES).is_err()
        && let Err(error) = state.set_send_buffer_size(socket.into(), SOCKET_BUFFER_BYTES)
    {
        tracing::debug!(%error, "cannot size the UDP send buffer");
    }
}

/// What one [`Udp::recv`] read: up to [`RECV_SLOTS`] buffers of up to 64 KiB.
#[derive(Debug)]
pub struct RecvBatch {
    buffers: Vec<Vec<u8>>,
    meta: [RecvMeta; RECV_SLOTS],
    filled: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self {
            buffers: (0..RECV_SLOTS).map(|_| vec![0; MAX_RUN_BYTES]).collect(),
            meta: [RecvMeta::default(); RECV_SLOTS],
            filled: 0,
        }
    }
}

impl RecvBatch {
    /// Each datagram read, with its sender, in the order the kernel had them.
    pub fn datagrams(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        self.meta
            .iter()
            .zip(&self.buffers)
            .take(self.filled)
            .flat_map(|(meta, buffer)| {
                let bytes = buffer.get(..meta.len).unwrap_or_default();
                // A stride of 0 would be a kernel bug; read the buffer as one datagram then.
                let stride = if meta.stride == 0 {
                    meta.len.max(1)
                } else {
                    meta.stride
                };
                bytes
                    .chunks(stride)
                    .map(move |datagram| (meta.addr, datagram))
            })
    }
}

/// Datagrams waiting to be sent, grouped into runs the kernel can take in one GSO send: the
/// same destination, every datagram the size of the first except a shorter last one. Order is
/// kept: a datagram never joins a run other than the last.
#[derive(Debug)]
pub struct SendQueue {
    /// Runs in use are `runs[..used]`; the rest are kept for their buffers.
    runs: Vec<Run>,
    used: usize,
    max_segments: usize,
}

#[derive(Debug)]
struct Run {
    destination: SocketAddr,
    segment_size: usize,
    segments: usize,
    /// A datagram shorter than `segment_size` ended the run.
    closed: bool,
    bytes: Vec<u8>,
}

impl Default for SendQueue {
    fn default() -> Self {
        Self {
            runs: Vec::new(),
            used: 0,
            max_segments: MAX_SEGMENTS,
        }
    }
}

impl SendQueue {
    /// Queues `datagram` for `destination`.
    pub fn push(&mut self, destination: SocketAddr, datagram: &[u8]) {
        let max_segments = self.max_segments;
        let max_segment = if destination.is_ipv4() {
            MAX_SEGMENT_V4
        } else {
            MAX_SEGMENT_V6
        };
        if let Some(last) = self.used.checked_sub(1).and_then(|i| self.runs.get_mut(i))
            && last.destination == destination
            && !last.closed
            && !datagram.is_empty()
            && last.segment_size <= max_segment
            && datagram.len() <= last.segment_size
            && last.segments < max_segments
            && last.bytes.len() + datagram.len() <= MAX_RUN_BYTES
        {
            last.bytes.extend_from_slice(datagram);
            last.segments += 1;
            last.closed = datagram.len() < last.segment_size;
            return;
        }
        let run = Run {
            destination,
            segment_size: datagram.len(),
            segments: 1,
            closed: false,
            bytes: Vec::new(),
        };
        let slot = match self.runs.get_mut(self.used) {
            Some(slot) => {
                let mut bytes = std::mem::take(&mut slot.bytes);
                bytes.clear();
                *slot = Run { bytes, ..run };
                slot
            }
            None => {
                self.runs.push(run);
                let Some(slot) = self.runs.last_mut() else {
                    return;
                };
                slot
            }
        };
        slot.bytes.extend_from_slice(datagram);
        self.used += 1;
    }

    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// How many datagrams are queued.
    #[cfg(test)]
    fn datagrams(&self) -> usize {
        self.runs.iter().take(self.used).map(|r| r.segments).sum()
    }

    /// The runs as `(destination, segment size, datagrams, bytes)`, for tests.
    #[cfg(test)]
    fn runs(&self) -> Vec<(SocketAddr, usize, usize, usize)> {
        self.runs
            .iter()
            .take(self.used)
            .map(|r| (r.destination, r.segment_size, r.segments, r.bytes.len()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(port: u16) -> SocketAddr {
        SocketAddr::from(([198, 18, 0, 1], port))
    }

    #[test]
    fn equal_datagrams_to_one_destination_make_one_run_ended_by_a_shorter_one() {
        let mut queue = SendQueue::default();
        for _ in 0..3 {
            queue.push(at(1), &[7; 100]);
        }
        queue.push(at(1), &[7; 40]);
        // After a shorter datagram the run is closed, even for a full-sized one.
        queue.push(at(1), &[7; 100]);
        assert_eq!(
            queue.runs(),
            vec![(at(1), 100, 4, 340), (at(1), 100, 1, 100)]
        );
        assert_eq!(queue.datagrams(), 5);
    }

    #[test]
    fn order_is_kept_across_destinations_and_larger_datagrams() {
        let mut queue = SendQueue::default();
        queue.push(at(1), &[1; 100]);
        queue.push(at(2), &[2; 100]);
        queue.push(at(1), &[1; 100]);
        queue.push(at(1), &[1; 200]);
        assert_eq!(
            queue.runs(),
            vec![
                (at(1), 100, 1, 100),
                (at(2), 100, 1, 100),
                (at(1), 100, 1, 100),
                (at(1), 200, 1, 200)
            ]
        );
    }

    #[test]
    fn a_run_stops_at_the_kernels_limits() {
        let mut queue = SendQueue::default();
        for _ in 0..(MAX_SEGMENTS + 1) {
            queue.push(at(1), &[0; 10]);
        }
        assert_eq!(
            queue.runs(),
            vec![
                (at(1), 10, MAX_SEGMENTS, 10 * MAX_SEGMENTS),
                (at(1), 10, 1, 10)
            ]
        );

        let mut queue = SendQueue::default();
        for _ in 0..50 {
            queue.push(at(1), &[0; 1452]);
        }
        let runs = queue.runs();
        assert!(runs.iter().all(|r| r.3 <= MAX_RUN_BYTES), "{runs:?}");
        assert_eq!(runs.iter().map(|r| r.2).sum::<usize>(), 50);
        assert_eq!(runs.first().map(|r| r.2), Some(MAX_RUN_BYTES / 1452));
    }

    #[test]
    fn datagrams_too_large_for_the_underlay_go_alone() {
        let mut queue = SendQueue::default();
        let v6 = SocketAddr::from(([0xfd00, 0, 0, 0, 0, 0, 0, 1], 1));
        for _ in 0..2 {
            queue.push(at(1), &[0; MAX_SEGMENT_V4]);
        }
        for _ in 0..2 {
            queue.push(at(1), &[0; MAX_SEGMENT_V4 + 1]);
        }
        for _ in 0..2 {
            queue.push(v6, &[0; MAX_SEGMENT_V4]);
        }
        assert_eq!(
            queue.runs(),
            vec![
                (at(1), MAX_SEGMENT_V4, 2, 2 * MAX_SEGMENT_V4),
                (at(1), MAX_SEGMENT_V4 + 1, 1, MAX_SEGMENT_V4 + 1),
                (at(1), MAX_SEGMENT_V4 + 1, 1, MAX_SEGMENT_V4 + 1),
                (v6, MAX_SEGMENT_V4, 1, MAX_SEGMENT_V4),
                (v6, MAX_SEGMENT_V4, 1, MAX_SEGMENT_V4),
            ]
        );
    }

    #[test]
    fn an_emptied_queue_is_reused_without_old_bytes() {
        let mut queue = SendQueue::default();
        queue.push(at(1), &[1; 10]);
        queue.push(at(2), &[2; 10]);
        queue.used = 0;
        queue.push(at(3), &[3; 4]);
        assert_eq!(queue.runs(), vec![(at(3), 4, 1, 4)]);
        assert_eq!(
            queue.runs.first().map(|r| r.bytes.clone()),
            Some(vec![3; 4])
        );
        // An empty datagram is a run of its own.
        queue.push(at(3), &[]);
        queue.push(at(3), &[]);
        assert_eq!(queue.datagrams(), 3);
    }
}
