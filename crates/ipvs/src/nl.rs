//! A small synchronous netlink transport over netlink-sys: send one request,
//! read its replies (across as many datagrams as the kernel needs) until the
//! ACK or NLMSG_DONE, and hand each data message to the caller to decode.
//!
//! Synchronous on purpose: kproxy's backends run on one blocking sync
//! thread, so an async connection task would only add a runtime hop.

use std::io;

use netlink_packet_core::{
    DecodeError, DoneBuffer, ErrorBuffer, NetlinkBuffer, NetlinkHeader, NetlinkMessage,
    NetlinkSerializable, Parseable, NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN, NLM_F_ACK,
    NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_sys::{Socket, SocketAddr};

/// What can go wrong on the wire, before the caller adds context.
#[derive(Debug)]
pub(crate) enum NlError {
    Io(io::Error),
    /// The kernel answered with this (positive) errno.
    Kernel(i32),
    Decode(DecodeError),
}

impl From<io::Error> for NlError {
    fn from(e: io::Error) -> Self {
        NlError::Io(e)
    }
}

impl From<DecodeError> for NlError {
    fn from(e: DecodeError) -> Self {
        NlError::Decode(e)
    }
}

pub(crate) struct NlSocket {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
    /// Datagrams the last answer took (diagnostics; proves multi-part reads).
    pub(crate) last_datagrams: usize,
}

/// Large enough for any single datagram the kernel sends for a dump
/// (it sizes dump skbs at most 32 KiB); bigger ones are detected with
/// MSG_TRUNC and read with a bigger buffer.
const RECV_BUF: usize = 64 * 1024;

impl NlSocket {
    pub(crate) fn new(protocol: isize) -> io::Result<NlSocket> {
        let mut socket = Socket::new(protocol)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // Errors echo only the request's header, not the whole request.
        let _ = socket.set_cap_ack(true);
        Ok(NlSocket {
            socket,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF),
            last_datagrams: 0,
        })
    }

    /// Sends `msg` as a request (`dump` = NLM_F_DUMP, else NLM_F_ACK plus
    /// `extra_flags`) and calls `on_msg` with every data message of the
    /// answer. Returns once the kernel acknowledged (or finished the dump).
    pub(crate) fn request<I, F>(
        &mut self,
        payload: I,
        dump: bool,
        extra_flags: u16,
        mut on_msg: F,
    ) -> Result<(), NlError>
    where
        I: NetlinkSerializable + std::fmt::Debug,
        NetlinkMessage<I>: From<I>,
        F: FnMut(&NetlinkHeader, &[u8]) -> Result<(), DecodeError>,
    {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut msg = NetlinkMessage::from(payload);
        msg.header.flags = NLM_F_REQUEST | extra_flags | if dump { NLM_F_DUMP } else { NLM_F_ACK };
        msg.header.sequence_number = seq;
        msg.finalize();
        let mut out = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut out);
        self.socket.send(&out, 0)?;

        self.last_datagrams = 0;
        loop {
            self.recv()?;
            self.last_datagrams += 1;
            let mut off = 0;
            while off < self.buf.len() {
                let nl = NetlinkBuffer::new_checked(&self.buf[off..])?;
                let len = nl.length() as usize;
                if len < 16 {
                    return Err(DecodeError::from("netlink message shorter than its header").into());
                }
                let header = NetlinkHeader::parse(&nl)?;
                let payload = nl.payload();
                off += (len + 3) & !3;
                if header.sequence_number != seq {
                    // A late answer to an earlier request (or a notification): not ours.
                    tracing::debug!(
                        seq = header.sequence_number,
                        want = seq,
                        "skipping netlink message of another request"
                    );
                    continue;
                }
                match header.message_type {
                    NLMSG_NOOP => {}
                    NLMSG_OVERRUN => return Err(NlError::Kernel(libc::ENOBUFS)),
                    NLMSG_ERROR => {
                        let err = ErrorBuffer::new_checked(&payload)?;
                        return match err.code() {
                            None => Ok(()),
                            Some(code) => Err(NlError::Kernel(code.get().abs())),
                        };
                    }
                    NLMSG_DONE => {
                        // A dump that failed half-way reports it in DONE.
                        if payload.len() >= 4 {
                            let code = DoneBuffer::new_checked(&payload)?.code();
                            if code < 0 {
                                return Err(NlError::Kernel(-code));
                            }
                        }
                        return Ok(());
                    }
                    _ => on_msg(&header, payload)?,
                }
            }
        }
    }

    /// Reads one datagram into `self.buf`, growing it when the datagram is
    /// larger than the buffer (MSG_TRUNC reports the real size).
    fn recv(&mut self) -> io::Result<()> {
        loop {
            self.buf.clear();
            let cap = self.buf.capacity();
            let n = self
                .socket
                .recv(&mut self.buf, libc::MSG_PEEK | libc::MSG_TRUNC)?;
            if n > cap {
                self.buf.reserve(n);
                continue;
            }
            self.buf.clear();
            self.socket.recv(&mut self.buf, 0)?;
            return Ok(());
        }
    }
}
