//! The kernel's TCP socket table via netlink `sock_diag` (what `ss -t` reads): the ground truth
//! that live connection counts are reconciled against.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
};

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_SOCK_DIAG};

/// TCP states (include/net/tcp_states.h).
pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_SYN_RECV: u8 = 3;

/// A connection counts as live on its backend while the kernel has it established or
/// half-open (SYN received). Once either side sent FIN it is winding down, which is also when
/// the data path decrements its count.
pub fn is_live(state: u8) -> bool {
    state == TCP_ESTABLISHED || state == TCP_SYN_RECV
}

/// (local, remote) → TCP state, for every TCP socket in this network namespace except
/// listeners and TIME-WAIT ones. IPv4-mapped IPv6 addresses (dual-stack sockets) are reported
/// as IPv4.
///
/// TIME-WAIT is left out on purpose: a busy host has tens of thousands of them (every closed
/// connection for a minute), and reading them twice a second cost the daemon a third of a CPU
/// under a stream of short connections. A flow whose backend socket is in TIME-WAIT is
/// finished: both FINs are acknowledged, and all that can still come is a retransmission of the
/// client's last FIN, which without the flow meets a RST from the host, ending the connection the
/// client was closing anyway.
pub type SocketTable = HashMap<(SocketAddr, SocketAddr), u8>;

fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

pub fn tcp_sockets() -> io::Result<SocketTable> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NlAddr::new(0, 0))?;
    let mut table = SocketTable::new();
    for family in [AF_INET, AF_INET6] {
        dump(&socket, family, &mut table)?;
    }
    Ok(table)
}

fn dump(socket: &Socket, family: u8, table: &mut SocketTable) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let socket_id = if family == AF_INET { SocketId::new_v4() } else { SocketId::new_v6() };
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all() & !(StateFlags::LISTEN | StateFlags::TIME_WAIT),
            socket_id,
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let mut rx = vec![0u8; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut rx[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&rx[offset..size])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag: {e}")))?;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => return Err(io::Error::other(format!("sock_diag: {e:?}"))),
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(resp)) => {
                    let id = &resp.header.socket_id;
                    let local = SocketAddr::new(unmap(id.source_address), id.source_port);
                    let remote = SocketAddr::new(unmap(id.destination_address), id.destination_port);
                    table.insert((local, remote), resp.header.state);
                }
                _ => {}
            }
            let len = msg.header.length as usize;
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;

    /// Needs no privileges: any process may dump its own namespace's sockets.
    #[test]
    fn sees_an_established_loopback_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let table = tcp_sockets().unwrap();
        let key = (listener.local_addr().unwrap(), client.local_addr().unwrap());
        assert_eq!(table.get(&key), Some(&TCP_ESTABLISHED), "server side of the connection");
        assert!(is_live(TCP_ESTABLISHED));
        assert!(!table.contains_key(&(listener.local_addr().unwrap(), "0.0.0.0:0".parse().unwrap())), "listeners are excluded");
    }
}
