//! The PS/2 controller, just enough for Linux's i8042 driver to probe it at once
//! and for the guest to reset through it (command 0xFE), which stops the VM.
//!
//! A controller that never answers makes the driver wait out its timeouts: seconds
//! of every boot. This one answers the controller-configuration and self-test
//! commands and ACKs keyboard commands; there is no keyboard input.

use std::collections::VecDeque;

use vm_superio::Trigger;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

const CTR_KBD_INT: u8 = 0x01;
const SELF_TEST_OK: u8 = 0x55;
const KBD_ACK: u8 = 0xfa;
const KBD_RESET: u8 = 0xff;
const KBD_SELF_TEST_OK: u8 = 0xaa;
/// A guest cannot queue more than this many answers: memory stays bounded.
const OUTPUT_MAX: usize = 16;

pub struct I8042<R: Trigger, I: Trigger> {
    reset: R,
    kbd_irq: I,
    ctr: u8,
    output_port: u8,
    /// The controller command whose data byte comes next on port 0x60.
    pending: Option<u8>,
    last_was_command: bool,
    output: VecDeque<u8>,
}

impl<R: Trigger, I: Trigger> I8042<R, I> {
    pub fn new(reset: R, kbd_irq: I) -> Self {
        I8042 {
            reset,
            kbd_irq,
            ctr: CTR_KBD_INT,
            output_port: 0x01,
            pending: None,
            last_was_command: false,
            output: VecDeque::new(),
        }
    }

    fn push(&mut self, byte: u8, from_keyboard: bool) {
        if self.output.len() < OUTPUT_MAX {
            self.output.push_back(byte);
        }
        if from_keyboard && self.ctr & CTR_KBD_INT != 0 {
            // A lost interrupt only delays the guest's driver; nothing to do on error.
            let _ = self.kbd_irq.trigger();
        }
    }

    /// Port 0x60 (offset 0) reads the output buffer; 0x64 (offset 4) the status.
    pub fn read(&mut self, offset: u8) -> u8 {
        match offset {
            0 => self.output.pop_front().unwrap_or(0),
            _ => {
                let mut s = STATUS_SYSTEM_FLAG;
                if !self.output.is_empty() {
                    s |= STATUS_OUTPUT_FULL;
                }
                if self.last_was_command {
                    s |= STATUS_LAST_WAS_COMMAND;
                }
                s
            }
        }
    }

    pub fn write(&mut self, offset: u8, value: u8) {
        if offset == 0 {
            self.last_was_command = false;
            match self.pending.take() {
                Some(CMD_WRITE_CTR) => self.ctr = value,
                Some(CMD_WRITE_OUTPUT_PORT) => self.output_port = value,
                _ => self.keyboard_command(value),
            }
            return;
        }
        self.last_was_command = true;
        match value {
            CMD_READ_CTR => self.push(self.ctr, false),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT_PORT => self.pending = Some(value),
            CMD_READ_OUTPUT_PORT => self.push(self.output_port, false),
            CMD_SELF_TEST => self.push(SELF_TEST_OK, false),
            CMD_TEST_KBD | CMD_TEST_AUX => self.push(0x00, false),
            CMD_DISABLE_AUX | CMD_ENABLE_AUX | CMD_DISABLE_KBD | CMD_ENABLE_KBD => {}
            CMD_RESET_CPU => {
                // The VM owner stops the VM; if it is already stopping, nothing to add.
                let _ = self.reset.trigger();
            }
            _ => {}
        }
    }

    fn keyboard_command(&mut self, value: u8) {
        self.push(KBD_ACK, true);
        if value == KBD_RESET {
            self.push(KBD_SELF_TEST_OK, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    #[derive(Clone, Default)]
    struct Count(Rc<Cell<u32>>);
    impl Trigger for Count {
        type E = ();
        fn trigger(&self) -> Result<(), ()> {
            self.0.set(self.0.get() + 1);
            Ok(())
        }
    }

    fn dev() -> (I8042<Count, Count>, Count, Count) {
        let (r, i) = (Count::default(), Count::default());
        (I8042::new(r.clone(), i.clone()), r, i)
    }

    #[test]
    fn ctr_round_trip_and_self_test() {
        let (mut d, _, _) = dev();
        assert_eq!(d.read(4) & STATUS_OUTPUT_FULL, 0);
        d.write(4, CMD_READ_CTR);
        assert_ne!(d.read(4) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(d.read(0), CTR_KBD_INT);
        d.write(4, CMD_WRITE_CTR);
        d.write(0, 0x47);
        d.write(4, CMD_READ_CTR);
        assert_eq!(d.read(0), 0x47);
        d.write(4, CMD_SELF_TEST);
        assert_eq!(d.read(0), SELF_TEST_OK);
        assert_eq!(d.read(4) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn keyboard_commands_are_acked_with_an_interrupt() {
        let (mut d, _, irq) = dev();
        d.write(0, KBD_RESET);
        assert_eq!((d.read(0), d.read(0)), (KBD_ACK, KBD_SELF_TEST_OK));
        assert_eq!(irq.0.get(), 2);
    }

    #[test]
    fn reset_and_bounded_output() {
        let (mut d, reset, _) = dev();
        for _ in 0..1000 {
            d.write(4, CMD_READ_CTR);
        }
        assert_eq!(d.output.len(), OUTPUT_MAX);
        d.write(4, CMD_RESET_CPU);
        assert_eq!(reset.0.get(), 1);
    }
}
