//! A minimal i8042 keyboard controller, with no keyboard or mouse behind it: enough for
//! Linux's driver to find the controller at once (it reads and writes the command byte,
//! and gives up after half a second per command that gets no answer: with nothing at
//! these ports a boot lost 1.2 s there), and the CPU reset line as the end of the VM.

/// Status and command port.
pub const COMMAND_PORT: u16 = 0x64;
/// Data port.
pub const DATA_PORT: u16 = 0x60;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
/// The keyboard is not locked (Linux warns about a "keylock" without it).
const STATUS_UNLOCKED: u8 = 0x10;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

/// What a write asks of the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Nothing beyond the controller.
    None,
    /// The guest pulsed the CPU reset line: the VM is over.
    Reset,
}

/// The controller's state.
#[derive(Debug, Clone)]
pub struct I8042 {
    /// The command byte (interrupts enabled, system flag, translation).
    ctr: u8,
    output_port: u8,
    /// The byte waiting for the guest at the data port.
    output: Option<u8>,
    /// A command waiting for its parameter at the data port.
    pending: Option<u8>,
    last_was_command: bool,
}

impl Default for I8042 {
    fn default() -> Self {
        Self {
            ctr: 0x47,
            output_port: 0x01, // reset line not asserted
            output: None,
            pending: None,
            last_was_command: false,
        }
    }
}

impl I8042 {
    /// A guest read of `port`.
    pub fn read(&mut self, port: u16) -> u8 {
        match port {
            COMMAND_PORT => {
                let mut s = STATUS_SYSTEM | STATUS_UNLOCKED;
                if self.output.is_some() {
                    s |= STATUS_OUTPUT_FULL;
                }
                if self.last_was_command {
                    s |= STATUS_LAST_WAS_COMMAND;
                }
                s
            }
            DATA_PORT => self.output.take().unwrap_or(0),
            _ => 0xff,
        }
    }

    /// A guest write of `value` to `port`.
    pub fn write(&mut self, port: u16, value: u8) -> Effect {
        match port {
            COMMAND_PORT => {
                self.last_was_command = true;
                self.pending = None;
                match value {
                    CMD_READ_CTR => self.output = Some(self.ctr),
                    CMD_READ_OUTPUT_PORT => self.output = Some(self.output_port),
                    CMD_SELF_TEST => self.output = Some(0x55),
                    CMD_KBD_TEST => self.output = Some(0x00),
                    CMD_WRITE_CTR | CMD_WRITE_OUTPUT_PORT => self.pending = Some(value),
                    CMD_RESET_CPU => return Effect::Reset,
                    // Port enables and disables, and the rest: accepted, no answer.
                    _ => {}
                }
            }
            DATA_PORT => {
                self.last_was_command = false;
                match self.pending.take() {
                    Some(CMD_WRITE_CTR) => self.ctr = value,
                    Some(CMD_WRITE_OUTPUT_PORT) => {
                        self.output_port = value;
                        // Bit 0 low holds the CPU in reset.
                        if value & 1 == 0 {
                            return Effect::Reset;
                        }
                    }
                    // Bytes for a keyboard that is not there: no answer.
                    _ => {}
                }
            }
            _ => {}
        }
        Effect::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux's `i8042_command`: wait for an empty input buffer (always), write the
    /// command and its parameters, then read each answer byte once the output is full.
    fn command(c: &mut I8042, cmd: u8, params: &[u8], answers: usize) -> Option<Vec<u8>> {
        assert_eq!(c.write(COMMAND_PORT, cmd), Effect::None);
        for &p in params {
            assert_eq!(c.write(DATA_PORT, p), Effect::None);
        }
        let mut out = Vec::new();
        for _ in 0..answers {
            if c.read(COMMAND_PORT) & STATUS_OUTPUT_FULL == 0 {
                return None; // Linux would time out here
            }
            out.push(c.read(DATA_PORT));
        }
        Some(out)
    }

    #[test]
    fn the_command_byte_reads_back_what_was_written() {
        let mut c = I8042::default();
        assert_eq!(
            c.read(COMMAND_PORT) & STATUS_OUTPUT_FULL,
            0,
            "nothing to read"
        );
        let ctr = command(&mut c, CMD_READ_CTR, &[], 1).unwrap()[0];
        assert_eq!(
            command(&mut c, CMD_READ_CTR, &[], 1).unwrap()[0],
            ctr,
            "stable"
        );
        command(&mut c, CMD_WRITE_CTR, &[0x30], 0).unwrap();
        assert_eq!(command(&mut c, CMD_READ_CTR, &[], 1), Some(vec![0x30]));
        assert_eq!(c.read(COMMAND_PORT) & STATUS_OUTPUT_FULL, 0, "answer taken");
        assert_eq!(command(&mut c, CMD_SELF_TEST, &[], 1), Some(vec![0x55]));
    }

    #[test]
    fn a_keyboard_command_gets_no_answer() {
        let mut c = I8042::default();
        assert_eq!(c.write(DATA_PORT, 0xf2), Effect::None); // keyboard: identify
        assert_eq!(c.read(COMMAND_PORT) & STATUS_OUTPUT_FULL, 0);
        // The command byte is untouched by a stray data byte.
        let ctr = command(&mut c, CMD_READ_CTR, &[], 1).unwrap()[0];
        assert_eq!(ctr, I8042::default().ctr);
    }

    #[test]
    fn the_reset_line_ends_the_vm() {
        let mut c = I8042::default();
        assert_eq!(c.write(COMMAND_PORT, CMD_RESET_CPU), Effect::Reset);
        let mut c = I8042::default();
        assert_eq!(c.write(COMMAND_PORT, CMD_WRITE_OUTPUT_PORT), Effect::None);
        assert_eq!(c.write(DATA_PORT, 0xfe), Effect::Reset, "bit 0 low");
        let mut c = I8042::default();
        assert_eq!(c.write(COMMAND_PORT, CMD_WRITE_OUTPUT_PORT), Effect::None);
        assert_eq!(c.write(DATA_PORT, 0x03), Effect::None);
        assert_eq!(
            command(&mut c, CMD_READ_OUTPUT_PORT, &[], 1),
            Some(vec![0x03])
        );
    }
}
