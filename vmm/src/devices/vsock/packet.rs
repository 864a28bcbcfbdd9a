//! The vsock packet on the wire: the 44-byte `virtio_vsock_hdr` and its payload, read from
//! a tx descriptor chain or written into an rx descriptor chain of any layout.
//!
//! `virtio_vsock::packet::VsockPacket` only accepts chains whose header and data each sit
//! in one descriptor and one host mapping; a hostile or merely unusual driver may split
//! them anywhere. So chains are walked with `virtio_queue`'s `Reader`/`Writer`, which take
//! any number of descriptors, and the header is decoded here field by field.

use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::GuestMemoryMmap;

/// Size of `virtio_vsock_hdr`, as the rust-vmm crate defines it.
pub const HDR_SIZE: usize = virtio_vsock::packet::PKT_HEADER_SIZE;

/// The only socket type this device speaks.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations (virtio 1.2, 5.10.6).
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// Flags of a SHUTDOWN packet: the sender will receive / send no more data.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// A decoded `virtio_vsock_hdr`. Decoding copies the bytes out of guest memory once, so a
/// guest rewriting the buffer while we look at it cannot change what we decided on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().expect("2 bytes"));
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a descriptor chain could not be used. Every variant is the guest's doing.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    #[error("descriptor chain points outside guest memory or overflows: {0}")]
    BadChain(virtio_queue::Error),
    #[error("tx chain holds {0} readable bytes, fewer than the {HDR_SIZE}-byte header")]
    HeaderTooShort(usize),
    #[error("tx header announces a {}-byte payload, over the {max}-byte limit", hdr.len)]
    PayloadTooLong { hdr: Header, max: u32 },
    #[error("tx header announces a {}-byte payload but the chain holds only {avail} bytes after the header", hdr.len)]
    PayloadTruncated { hdr: Header, avail: usize },
    #[error("rx chain offers {0} writable bytes, fewer than the {HDR_SIZE}-byte header")]
    RxBufferTooSmall(usize),
    #[error("guest memory access failed while copying a packet: {0}")]
    Copy(std::io::Error),
}

impl PacketError {
    /// The header of a packet whose payload was unusable, so its connection can be reset.
    pub fn header(&self) -> Option<&Header> {
        match self {
            PacketError::PayloadTooLong { hdr, .. } | PacketError::PayloadTruncated { hdr, .. } => {
                Some(hdr)
            }
            _ => None,
        }
    }
}

type Chain<'m> = DescriptorChain<&'m GuestMemoryMmap>;

/// Reads one packet from a tx chain. The payload is copied out, at most `max_payload` bytes.
pub fn read_tx(
    mem: &GuestMemoryMmap,
    chain: Chain<'_>,
    max_payload: u32,
) -> Result<(Header, Vec<u8>), PacketError> {
    let mut reader: Reader<'_> = Reader::new(mem, chain).map_err(PacketError::BadChain)?;
    let avail = reader.available_bytes();
    if avail < HDR_SIZE {
        return Err(PacketError::HeaderTooShort(avail));
    }
    let mut raw = [0u8; HDR_SIZE];
    reader.read_exact(&mut raw).map_err(PacketError::Copy)?;
    let hdr = Header::from_bytes(&raw);
    if hdr.len == 0 {
        return Ok((hdr, Vec::new()));
    }
    if hdr.len > max_payload {
        return Err(PacketError::PayloadTooLong {
            hdr,
            max: max_payload,
        });
    }
    let avail = reader.available_bytes();
    if avail < hdr.len as usize {
        return Err(PacketError::PayloadTruncated { hdr, avail });
    }
    let mut data = vec![0u8; hdr.len as usize];
    reader.read_exact(&mut data).map_err(PacketError::Copy)?;
    Ok((hdr, data))
}

/// The writable part of an rx chain, ready to take one packet.
pub struct RxBuffer<'m> {
    writer: Writer<'m>,
}

impl<'m> RxBuffer<'m> {
    pub fn new(mem: &'m GuestMemoryMmap, chain: Chain<'m>) -> Result<Self, PacketError> {
        let writer: Writer<'m> = Writer::new(mem, chain).map_err(PacketError::BadChain)?;
        let avail = writer.available_bytes();
        if avail < HDR_SIZE {
            return Err(PacketError::RxBufferTooSmall(avail));
        }
        Ok(RxBuffer { writer })
    }

    /// Payload bytes this buffer can take after the header.
    pub fn payload_capacity(&self) -> usize {
        self.writer.available_bytes() - HDR_SIZE
    }

    /// Writes the header (its `len` set to `data.len()`) and the data; returns the bytes
    /// written, which is the used length to report. `data` must fit `payload_capacity()`.
    pub fn write(mut self, mut hdr: Header, data: &[u8]) -> Result<u32, PacketError> {
        debug_assert!(data.len() <= self.payload_capacity());
        hdr.len = data.len() as u32;
        self.writer
            .write_all(&hdr.to_bytes())
            .map_err(PacketError::Copy)?;
        self.writer.write_all(data).map_err(PacketError::Copy)?;
        Ok((HDR_SIZE + data.len()) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_through_bytes() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234_5678,
            dst_port: 1,
            len: 99,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 3,
            buf_alloc: 65536,
            fwd_cnt: 7,
        };
        let b = h.to_bytes();
        assert_eq!(b[0], 3);
        assert_eq!(b[8], 2);
        assert_eq!(&b[16..20], &0x1234_5678u32.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
    }

    #[test]
    fn header_size_matches_the_spec() {
        assert_eq!(HDR_SIZE, 44);
    }
}
