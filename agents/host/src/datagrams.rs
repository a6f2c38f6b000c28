//! Small datagrams to and from many peers, a batch per system call (`recvmmsg`, `sendmmsg`):
//! the client's DNS front, where each query and each answer is its own datagram and the
//! system calls, not the work between them, are most of the cost.
//!
//! Unlike [`crate::udp`] (one peer's bulk transfer, coalesced by the kernel), every datagram
//! here keeps its own address and size. A datagram larger than a receive slot is dropped, not
//! cut: a DNS query never needs more than [`SLOT_BYTES`].

use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd as _};

use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg};
use tokio::io::Interest;

/// Datagrams one system call reads or writes at most.
pub const BATCH: usize = 32;

/// The largest datagram a receive slot holds.
pub const SLOT_BYTES: usize = 4096;

/// Receive slots and what the last read put in them.
#[derive(Debug)]
pub struct Inbox {
    slots: Vec<[u8; SLOT_BYTES]>,
    /// Per datagram read: its slot's length in use and its sender.
    received: Vec<(usize, SocketAddr)>,
}

impl Default for Inbox {
    fn default() -> Self {
        Inbox {
            slots: vec![[0; SLOT_BYTES]; BATCH],
            received: Vec::with_capacity(BATCH),
        }
    }
}

impl Inbox {
    /// Waits until `socket` has datagrams and reads as many as are there, up to [`BATCH`].
    pub async fn recv(&mut self, socket: &tokio::net::UdpSocket) -> io::Result<()> {
        loop {
            socket.readable().await?;
            match socket.try_io(Interest::READABLE, || self.read_now(socket)) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                result => return result,
            }
        }
    }

    fn read_now(&mut self, socket: &impl AsFd) -> io::Result<()> {
        self.received.clear();
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
        let mut slices: Vec<[IoSliceMut<'_>; 1]> = self
            .slots
            .iter_mut()
            .map(|slot| [IoSliceMut::new(slot)])
            .collect();
        let read = recvmmsg(
            socket.as_fd().as_raw_fd(),
            &mut headers,
            slices.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )?;
        for message in read {
            if message.flags.contains(MsgFlags::MSG_TRUNC) {
                tracing::debug!(
                    bytes = message.bytes,
                    "a datagram larger than {SLOT_BYTES} bytes is dropped"
                );
                // Its slot stays in the count, so that later datagrams keep theirs.
                self.received.push((0, unspecified()));
                continue;
            }
            let from = message.address.and_then(|address| to_socket_addr(&address));
            self.received
                .push((message.bytes, from.unwrap_or_else(unspecified)));
        }
        Ok(())
    }

    /// The datagrams of the last read, with their senders, in the order read. A dropped
    /// datagram (too large, or from no address) is not among them.
    pub fn datagrams(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        self.received
            .iter()
            .zip(&self.slots)
            .filter(|((length, from), _)| *length > 0 && !from.ip().is_unspecified())
            .filter_map(|((length, from), slot)| Some((*from, slot.get(..*length)?)))
    }
}

fn unspecified() -> SocketAddr {
    (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
}

fn to_socket_addr(address: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = address.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    address
        .as_sockaddr_in6()
        .map(|v6| SocketAddr::V6((*v6).into()))
}

/// Sends every datagram, [`BATCH`] per system call: to its address, or, with `None`, to where
/// the socket is connected. A datagram the kernel refuses (a buffer full, a route missing) is
/// lost, as on the network, and the rest still go; returns how many were refused.
pub fn send_all(socket: &impl AsFd, datagrams: &[(Option<SocketAddr>, &[u8])]) -> usize {
    let mut refused = 0;
    let mut rest = datagrams;
    while !rest.is_empty() {
        let batch = rest.get(..BATCH.min(rest.len())).unwrap_or(rest);
        match send_batch(socket, batch) {
            // The kernel stops at the first datagram it refuses: skip that one, go on.
            Ok(sent) if sent < batch.len() => {
                refused += 1;
                rest = rest.get(sent + 1..).unwrap_or_default();
            }
            Ok(sent) => rest = rest.get(sent..).unwrap_or_default(),
            Err(error) => {
                tracing::debug!(%error, "a datagram was refused");
                refused += 1;
                rest = rest.get(1..).unwrap_or_default();
            }
        }
    }
    refused
}

fn send_batch(socket: &impl AsFd, batch: &[(Option<SocketAddr>, &[u8])]) -> io::Result<usize> {
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(batch.len(), None);
    let slices: Vec<[IoSlice<'_>; 1]> = batch
        .iter()
        .map(|(_, bytes)| [IoSlice::new(bytes)])
        .collect();
    let addresses: Vec<Option<SockaddrStorage>> = batch
        .iter()
        .map(|(to, _)| to.map(SockaddrStorage::from))
        .collect();
    let sent = sendmmsg(
        socket.as_fd().as_raw_fd(),
        &mut headers,
        slices.iter(),
        &addresses,
        [],
        MsgFlags::MSG_DONTWAIT,
    )?;
    Ok(sent.count())
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, UdpSocket};

    use super::*;

    /// A socket on loopback whose reads fail instead of hanging when nothing came.
    fn local() -> UdpSocket {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        socket
    }

    /// The socket an [`Inbox`] reads, on loopback, and its address.
    async fn receiver() -> (tokio::net::UdpSocket, SocketAddr) {
        let socket = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let address = socket.local_addr().unwrap();
        (socket, address)
    }

    #[tokio::test]
    async fn one_read_takes_every_queued_datagram_with_its_sender() {
        let (receiver, to) = receiver().await;
        let (first, second) = (local(), local());
        first.send_to(b"one", to).unwrap();
        second.send_to(b"two", to).unwrap();
        first.send_to(b"three", to).unwrap();

        let mut inbox = Inbox::default();
        inbox.recv(&receiver).await.unwrap();
        let read: Vec<(SocketAddr, Vec<u8>)> = inbox
            .datagrams()
            .map(|(from, bytes)| (from, bytes.to_vec()))
            .collect();
        let expected = vec![
            (first.local_addr().unwrap(), b"one".to_vec()),
            (second.local_addr().unwrap(), b"two".to_vec()),
            (first.local_addr().unwrap(), b"three".to_vec()),
        ];
        assert_eq!(read, expected);
    }

    #[tokio::test]
    async fn a_datagram_too_large_for_a_slot_is_dropped_and_the_next_kept() {
        let (receiver, to) = receiver().await;
        let sender = local();
        sender.send_to(&[7; SLOT_BYTES + 1], to).unwrap();
        sender.send_to(b"after", to).unwrap();

        let mut inbox = Inbox::default();
        inbox.recv(&receiver).await.unwrap();
        let read: Vec<Vec<u8>> = inbox.datagrams().map(|(_, bytes)| bytes.to_vec()).collect();
        assert_eq!(read, vec![b"after".to_vec()]);
    }

    #[test]
    fn send_all_reaches_every_address_past_one_the_kernel_refuses() {
        let sender = local();
        let receivers: Vec<UdpSocket> = (0..BATCH + 3).map(|_| local()).collect();
        let mut datagrams: Vec<(Option<SocketAddr>, &[u8])> = receivers
            .iter()
            .map(|receiver| (Some(receiver.local_addr().unwrap()), b"hello".as_slice()))
            .collect();
        // An IPv6 destination from an IPv4 socket: refused by the kernel, in the first batch.
        datagrams.insert(3, (Some("[::1]:53".parse().unwrap()), b"refused"));

        assert_eq!(send_all(&sender, &datagrams), 1);
        for receiver in &receivers {
            let mut buffer = [0u8; 16];
            let (length, from) = receiver.recv_from(&mut buffer).unwrap();
            assert_eq!(
                (&buffer[..length], from),
                (&b"hello"[..], sender.local_addr().unwrap())
            );
        }
    }

    #[test]
    fn send_all_without_an_address_goes_where_the_socket_is_connected() {
        let (sender, receiver) = (local(), local());
        sender.connect(receiver.local_addr().unwrap()).unwrap();
        assert_eq!(send_all(&sender, &[(None, b"a"), (None, b"b")]), 0);
        let mut buffer = [0u8; 4];
        for expected in [b"a", b"b"] {
            let length = receiver.recv(&mut buffer).unwrap();
            assert_eq!(&buffer[..length], expected);
        }
    }
}
