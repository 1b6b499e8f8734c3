//! The chooser on UEFI: find the disk this image was loaded from, choose
//! and count the slot, load its UKI from the slot partition, start it.

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;
use kiln_boot::gpt::{BlockDev, Partition, Table, SECTOR};
use kiln_boot::{choose, Slot, SlotHeader, SlotState, SLOT_TYPE};
use uefi::boot::{self, LoadImageSource, OpenProtocolAttributes, OpenProtocolParams, SearchType};
use uefi::prelude::*;
use uefi::proto::device_path::DevicePath;
use uefi::proto::loaded_image::LoadedImage;
use uefi::proto::media::block::BlockIO;
use uefi::{println, Identify};

/// A whole disk through Block I/O.
struct Disk {
    io: boot::ScopedProtocol<BlockIO>,
    media_id: u32,
    last: u64,
    align: usize,
}

impl BlockDev for Disk {
    type Error = uefi::Error;

    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), uefi::Error> {
        let mut tmp = Aligned::new(buf.len(), self.align);
        self.io.read_blocks(self.media_id, lba, tmp.as_mut())?;
        buf.copy_from_slice(tmp.as_mut());
        Ok(())
    }

    fn write(&mut self, lba: u64, buf: &[u8]) -> Result<(), uefi::Error> {
        let mut tmp = Aligned::new(buf.len(), self.align);
        tmp.as_mut().copy_from_slice(buf);
        self.io.write_blocks(self.media_id, lba, tmp.as_mut())
    }

    fn flush(&mut self) -> Result<(), uefi::Error> {
        self.io.flush_blocks()
    }

    fn last_lba(&self) -> u64 {
        self.last
    }
}

/// A buffer aligned as Block I/O asks (`IoAlign`).
struct Aligned {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize, align: usize) -> Aligned {
        let align = align.max(1);
        let buf = vec![0u8; len + align];
        let start = buf.as_ptr().align_offset(align);
        Aligned { buf, start, len }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

#[entry]
fn main() -> Status {
    match run() {
        Ok(never) => match never {},
        Err(msg) => {
            println!("kiln-boot: {msg}; restarting in 10 s");
            boot::stall(core::time::Duration::from_secs(10));
            uefi::runtime::reset(uefi::runtime::ResetType::COLD, Status::ABORTED, None)
        }
    }
}

fn run() -> Result<core::convert::Infallible, &'static str> {
    let mut disk = boot_disk().ok_or("cannot find the disk this loader is on")?;
    let mut table = Table::read(&mut disk).map_err(|_| "the disk has no valid GPT")?;
    let slots: Vec<(Slot, Partition, Option<SlotHeader>)> = table
        .partitions()
        .into_iter()
        .filter(|p| p.type_guid == SLOT_TYPE)
        .filter_map(|p| {
            let slot = Slot::from_partition_name(&p.name)?;
            let header = read_header(&mut disk, &p);
            Some((slot, p, header))
        })
        .collect();
    let candidates: Vec<(Slot, SlotState, bool)> = slots
        .iter()
        .map(|(s, p, h)| (*s, SlotState::from_attributes(p.attributes), h.is_some()))
        .collect();
    let choice = choose(&candidates).ok_or("no slot holds an image")?;
    let Some((_, part, Some(header))) = slots.iter().find(|(s, _, _)| *s == choice.slot) else {
        return Err("the chosen slot vanished");
    };
    let before = SlotState::from_attributes(part.attributes);
    if choice.state != before {
        table
            .set_attributes::<uefi::Error>(part.number, choice.state.to_attributes(part.attributes))
            .map_err(|_| "cannot update the slot's boot bits")?;
        table.write(&mut disk).map_err(|_| "cannot write the GPT")?;
    }
    let tries = if choice.state.successful {
        alloc::string::String::from("good")
    } else {
        alloc::format!("{} tries left after this one", choice.state.tries)
    };
    println!(
        "kiln-boot: slot {} ({} {}, {tries}){}",
        choice.slot.letter(),
        header.name,
        header.version,
        if choice.fallback {
            ", no slot had tries left"
        } else {
            ""
        }
    );
    let uki = read_uki(&mut disk, part, header)?;
    let image = boot::load_image(
        boot::image_handle(),
        LoadImageSource::FromBuffer {
            buffer: &uki,
            file_path: None,
        },
    )
    .map_err(|_| "the firmware refused the slot's UKI")?;
    drop(uki);
    boot::start_image(image).map_err(|_| "the slot's UKI failed to start")?;
    Err("the slot's UKI returned")
}

/// The slot's header, if intact and fitting its partition.
fn read_header(disk: &mut Disk, p: &Partition) -> Option<SlotHeader> {
    let mut b = vec![0u8; kiln_boot::slot::HEADER_LEN];
    let lba = p.last_lba + 1 - (b.len() / SECTOR) as u64;
    disk.read(lba, &mut b).ok()?;
    SlotHeader::decode(&b).filter(|h| h.fits(p.len()))
}

/// The UKI, read from the slot and checked against the header's digest.
fn read_uki(disk: &mut Disk, p: &Partition, h: &SlotHeader) -> Result<Vec<u8>, &'static str> {
    use sha2::Digest;
    let len = usize::try_from(h.uki_len).map_err(|_| "UKI too large")?;
    let mut buf = vec![0u8; len.next_multiple_of(SECTOR)];
    let lba = p.first_lba + h.uki_offset / SECTOR as u64;
    // In 1 MiB reads: some firmware limits a single transfer.
    let chunk = 1 << 20;
    for (i, part) in buf.chunks_mut(chunk).enumerate() {
        disk.read(lba + (i * chunk / SECTOR) as u64, part)
            .map_err(|_| "cannot read the slot's UKI")?;
    }
    buf.truncate(len);
    let digest: [u8; 32] = sha2::Sha256::digest(&buf).into();
    if digest != h.uki_sha256 {
        return Err("the slot's UKI does not match its header's digest");
    }
    Ok(buf)
}

/// The whole disk holding the partition this image was loaded from.
fn boot_disk() -> Option<Disk> {
    let loaded = boot::open_protocol_exclusive::<LoadedImage>(boot::image_handle()).ok()?;
    let esp = loaded.device()?;
    let esp_path = open::<DevicePath>(esp)?;
    let esp_bytes = esp_path.as_bytes();
    let handles = boot::locate_handle_buffer(SearchType::ByProtocol(&BlockIO::GUID)).ok()?;
    for &h in handles.iter() {
        let Some(io) = open::<BlockIO>(h) else {
            continue;
        };
        if io.media().is_logical_partition() || io.media().block_size() as usize != SECTOR {
            continue;
        }
        let Some(path) = open::<DevicePath>(h) else {
            continue;
        };
        // The disk's path (less its end node) begins the partition's.
        let p = path.as_bytes();
        let prefix = &p[..p.len().saturating_sub(4)];
        if prefix.is_empty() || !esp_bytes.starts_with(prefix) || esp_bytes.len() <= p.len() {
            continue;
        }
        let media = io.media();
        let (media_id, last, align) = (
            media.media_id(),
            media.last_block(),
            media.io_align() as usize,
        );
        return Some(Disk {
            io,
            media_id,
            last,
            align,
        });
    }
    None
}

/// A protocol of `handle`, opened without taking it from its drivers.
fn open<P: uefi::proto::ProtocolPointer + ?Sized>(
    handle: Handle,
) -> Option<boot::ScopedProtocol<P>> {
    // SAFETY: the handles are the firmware's own disks and this image's
    // device; none is uninstalled while the loader runs.
    unsafe {
        boot::open_protocol::<P>(
            OpenProtocolParams {
                handle,
                agent: boot::image_handle(),
                controller: None,
            },
            OpenProtocolAttributes::GetProtocol,
        )
    }
    .ok()
}
