//! COM1 (16550 at 0x3F8, IRQ 4) through vm-superio, writing to stdout, the log and/or a buffer.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// COM1 base port.
pub const COM1_BASE: u16 = 0x3F8;
/// COM1 ISA IRQ / GSI.
pub const COM1_IRQ: u32 = 4;
/// Ports COM1 decodes.
pub const COM1_PORTS: u16 = 8;

/// Where the guest's serial output goes.
#[derive(Clone, Debug, Default)]
pub struct SerialSink {
    /// Copy every byte to this process's stdout.
    pub stdout: bool,
    /// Log each complete line at info level (target `guest`).
    pub log: bool,
    /// Collect everything here.
    pub buffer: Option<Arc<Mutex<Vec<u8>>>>,
}

impl SerialSink {
    /// A sink that only collects into a fresh buffer (returned too).
    pub fn buffered() -> (SerialSink, Arc<Mutex<Vec<u8>>>) {
        let buf = Arc::new(Mutex::new(Vec::new()));
        (
            SerialSink {
                stdout: false,
                log: false,
                buffer: Some(buf.clone()),
            },
            buf,
        )
    }
}

/// The `Write` end vm-superio drives.
struct SinkWriter {
    sink: SerialSink,
    line: Vec<u8>,
}

impl Write for SinkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.sink.stdout {
            let mut out = std::io::stdout().lock();
            out.write_all(data)?;
            out.flush()?;
        }
        if let Some(buf) = &self.sink.buffer {
            buf.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend_from_slice(data);
        }
        if self.sink.log {
            for &b in data {
                if b == b'\n' {
                    tracing::info!(target: "guest", "{}", String::from_utf8_lossy(&self.line).trim_end());
                    self.line.clear();
                } else if self.line.len() < 4096 {
                    self.line.push(b);
                }
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Raises COM1's interrupt through an irqfd.
struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// COM1.
pub struct Com1 {
    serial: Serial<IrqTrigger, vm_superio::serial::NoEvents, SinkWriter>,
}

impl std::fmt::Debug for Com1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Com1").finish_non_exhaustive()
    }
}

impl Com1 {
    /// COM1 raising `irq` (an EventFd registered as irqfd for GSI 4) and writing to `sink`.
    pub fn new(irq: EventFd, sink: SerialSink) -> Com1 {
        Com1 {
            serial: Serial::new(
                IrqTrigger(irq),
                SinkWriter {
                    sink,
                    line: Vec::new(),
                },
            ),
        }
    }

    /// Whether `port` belongs to COM1.
    pub fn claims(port: u16) -> bool {
        (COM1_BASE..COM1_BASE + COM1_PORTS).contains(&port)
    }

    /// Guest IN from a COM1 port.
    pub fn read(&mut self, port: u16) -> u8 {
        self.serial.read(port.wrapping_sub(COM1_BASE) as u8)
    }

    /// Guest OUT to a COM1 port.
    pub fn write(&mut self, port: u16, value: u8) {
        if let Err(e) = self.serial.write(port.wrapping_sub(COM1_BASE) as u8, value) {
            tracing::debug!("COM1 write: {e:?}");
        }
    }

    /// Queues input bytes for the guest (console input).
    pub fn enqueue_input(&mut self, bytes: &[u8]) {
        if let Err(e) = self.serial.enqueue_raw_bytes(bytes) {
            tracing::debug!("COM1 input: {e:?}");
        }
    }
}

/// A shareable COM1.
pub type SharedCom1 = Arc<Mutex<Com1>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_reach_the_buffer_and_lsr_reports_empty_transmitter() {
        let (sink, buf) = SerialSink::buffered();
        let mut com = Com1::new(EventFd::new(0).unwrap(), sink);
        for b in b"hi\n" {
            com.write(COM1_BASE, *b);
        }
        assert_eq!(&*buf.lock().unwrap(), b"hi\n");
        // LSR: THR empty (bit 5) and transmitter empty (bit 6).
        assert_eq!(com.read(COM1_BASE + 5) & 0x60, 0x60);
        assert!(Com1::claims(0x3FD) && !Com1::claims(0x2F8));
    }
}
