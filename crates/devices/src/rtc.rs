//! A minimal MC146818 CMOS real-time clock, so Linux reads a valid wall-clock
//! date at boot without stalling.
//!
//! This module owns the index/data register pair at ports `0x70`/`0x71`, the
//! 128 bytes of CMOS RAM behind it, and the conversion of the host's UTC time
//! into the RTC's BCD date and time registers (including the civil-date
//! arithmetic, days since 1970-01-01 to year/month/day).
//!
//! It must never panic on a guest access, never let the guest set the host
//! clock or its own view of time (time and status writes are ignored), and
//! never raise interrupts: there is no alarm, periodic or update interrupt.

use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use chitin_bus::BusDevice;

/// First I/O port of the RTC: the index register.
pub const RTC_BASE: u64 = 0x70;
/// Number of I/O ports of the RTC: index (`0x70`) and data (`0x71`).
pub const RTC_LEN: u64 = 2;

/// Offset of the index register; bit 7 of a write masks NMIs on a PC.
const INDEX_OFFSET: u64 = 0;
/// Offset of the data register, which accesses the indexed CMOS byte.
const DATA_OFFSET: u64 = 1;

/// What a read of a write-only or missing port returns: an idle ISA bus
/// floats high.
const FLOATING_BUS: u8 = 0xff;

/// Size of CMOS RAM, registers included.
const CMOS_SIZE: usize = 128;
/// The index selects one of the 128 CMOS bytes; bit 7 is the NMI mask.
const INDEX_MASK: u8 = 0x7f;

// Time registers (MC146818 datasheet, table 2; century per the ACPI FADT
// convention used by PCs).
const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_CENTURY: u8 = 0x32;

// Status registers.
const REG_STATUS_A: u8 = 0x0a;
const REG_STATUS_B: u8 = 0x0b;
const REG_STATUS_C: u8 = 0x0c;
const REG_STATUS_D: u8 = 0x0d;
/// 32.768 kHz time base (`DV = 010`), 1024 Hz periodic rate (`RS = 0110`);
/// bit 7 (update in progress) always clear, so readers never wait.
const STATUS_A: u8 = 0x26;
/// 24-hour mode (bit 1), BCD data (bit 2 clear), no interrupts enabled.
const STATUS_B: u8 = 0x02;
/// No interrupt flags.
const STATUS_C: u8 = 0x00;
/// Valid RAM and time: the battery is good.
const STATUS_D: u8 = 0x80;

const SECONDS_PER_MINUTE: u64 = 60;
const SECONDS_PER_HOUR: u64 = 60 * SECONDS_PER_MINUTE;
const SECONDS_PER_DAY: u64 = 24 * SECONDS_PER_HOUR;

/// A calendar date and time of day in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: u64,
    /// 1..=12
    month: u8,
    /// 1..=31
    day: u8,
    /// 1..=7, 1 is Sunday (the RTC's convention).
    weekday: u8,
    hour: u8,
    minute: u8,
    second: u8,
}

impl DateTime {
    /// Splits a count of seconds since 1970-01-01T00:00:00Z.
    fn from_unix_seconds(seconds: u64) -> Self {
        let days = seconds / SECONDS_PER_DAY;
        let second_of_day = seconds % SECONDS_PER_DAY;
        let (year, month, day) = civil_from_days(days);
        // Each quotient below is bounded by its divisor (< 24, < 60), so the
        // narrowing casts cannot truncate.
        Self {
            year,
            month,
            day,
            weekday: weekday_from_days(days),
            hour: (second_of_day / SECONDS_PER_HOUR) as u8,
            minute: (second_of_day % SECONDS_PER_HOUR / SECONDS_PER_MINUTE) as u8,
            second: (second_of_day % SECONDS_PER_MINUTE) as u8,
        }
    }
}

/// Converts days since 1970-01-01 to a proleptic Gregorian (year, month, day).
///
/// The calendar is counted in 400-year eras starting on 0000-03-01, so that
/// the leap day falls at the end of each (March-based) year and every era
/// has exactly 146 097 days.
fn civil_from_days(days: u64) -> (u64, u8, u8) {
    /// Days from 0000-03-01 to 1970-01-01.
    const EPOCH_FROM_ERA_START: u64 = 719_468;
    /// Days in 400 Gregorian years.
    const DAYS_PER_ERA: u64 = 146_097;
    /// Days in 4 years, including the leap day.
    const DAYS_PER_4_YEARS: u64 = 1_460;
    /// Days in 100 years: 24 leap days.
    const DAYS_PER_CENTURY: u64 = 36_524;

    let shifted = days + EPOCH_FROM_ERA_START;
    let era = shifted / DAYS_PER_ERA;
    let day_of_era = shifted % DAYS_PER_ERA;
    // Remove the leap days seen so far in the era so that a plain division
    // by 365 yields the year; the last day of the era (a leap day) stays in
    // year 399.
    let year_of_era = (day_of_era - day_of_era / DAYS_PER_4_YEARS + day_of_era / DAYS_PER_CENTURY
        - day_of_era / (DAYS_PER_ERA - 1))
        / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    // Months from March: their lengths repeat 31,30,31,30,31 every 153 days,
    // so a 5/153 slope maps day-of-year to month index 0 (March)..=11 (Feb).
    let march_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * march_month + 2) / 5 + 1;
    let month = if march_month < 10 {
        march_month + 3
    } else {
        march_month - 9
    };
    // January and February belong to the next civil year.
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    // month is 1..=12 and day is 1..=31 by construction.
    (year, month as u8, day as u8)
}

/// The RTC day of the week (1 = Sunday) of a day counted from 1970-01-01,
/// which was a Thursday.
fn weekday_from_days(days: u64) -> u8 {
    /// Days from the Sunday before the epoch to the epoch itself.
    const THURSDAY: u64 = 4;
    ((days + THURSDAY) % 7) as u8 + 1
}

/// Encodes the last two decimal digits of `value` as packed BCD.
fn to_bcd(value: u64) -> u8 {
    let two_digits = (value % 100) as u8;
    ((two_digits / 10) << 4) | (two_digits % 10)
}

/// The index register and CMOS RAM.
struct Cmos {
    index: u8,
    ram: [u8; CMOS_SIZE],
}

/// What an RTC carries across a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtcState {
    /// The index register.
    pub index: u8,
    /// The CMOS RAM.
    pub ram: Vec<u8>,
}

/// A minimal MC146818 CMOS RTC at ports `0x70` (index) and `0x71` (data).
///
/// Put it on the port-I/O bus at [`RTC_BASE`] with length [`RTC_LEN`]. The
/// date and time registers (seconds `0x00`, minutes `0x02`, hours `0x04` in
/// 24-hour format, weekday `0x06` with 1 = Sunday, day `0x07`, month `0x08`,
/// two-digit year `0x09`, century `0x32`) are BCD, taken from the host's UTC
/// clock at the moment of each read. Status A reads `0x26` (never an update
/// in progress), B `0x02` (24-hour, BCD, no interrupts), C `0`, D `0x80`
/// (valid). Writes to those registers are ignored; the other CMOS bytes are
/// plain RAM, initially 0. Bit 7 of the index (NMI mask) is ignored. Only
/// single-byte accesses do anything: others read `0xff` and ignore writes,
/// as does a read of the write-only index port.
pub struct CmosRtc {
    cmos: Mutex<Cmos>,
    /// The wall clock; fixed by tests.
    now: fn() -> SystemTime,
}

impl fmt::Debug for CmosRtc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CmosRtc")
            .field("index", &self.cmos().index)
            .finish_non_exhaustive()
    }
}

impl Default for CmosRtc {
    fn default() -> Self {
        Self::new()
    }
}

impl CmosRtc {
    /// Creates the RTC, reading the host's system clock.
    pub fn new() -> Self {
        Self::with_clock(SystemTime::now)
    }

    fn with_clock(now: fn() -> SystemTime) -> Self {
        Self {
            cmos: Mutex::new(Cmos {
                index: 0,
                ram: [0; CMOS_SIZE],
            }),
            now,
        }
    }

    /// The index register and the CMOS RAM, for a snapshot (the clock
    /// registers are read from the host's clock, so they carry nothing).
    pub fn state(&self) -> RtcState {
        let cmos = self.cmos();
        RtcState {
            index: cmos.index,
            ram: cmos.ram.to_vec(),
        }
    }

    /// An RTC with a snapshot's `state`: RAM beyond the CMOS's 128 bytes
    /// is ignored, missing bytes read 0.
    pub fn with_state(state: &RtcState) -> Self {
        let rtc = Self::new();
        {
            let mut cmos = rtc.cmos();
            cmos.index = state.index & INDEX_MASK;
            let n = state.ram.len().min(CMOS_SIZE);
            cmos.ram[..n].copy_from_slice(&state.ram[..n]);
        }
        rtc
    }

    /// Locks the CMOS. It is plain bytes, always consistent, so a lock
    /// poisoned by a panicking holder is taken over.
    fn cmos(&self) -> MutexGuard<'_, Cmos> {
        self.cmos.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current UTC date and time; a host clock set before 1970 reads as
    /// the epoch.
    fn date_time(&self) -> DateTime {
        let seconds = (self.now)()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        DateTime::from_unix_seconds(seconds)
    }

    /// The value of the time or status register `index`, or `None` when the
    /// byte is plain RAM.
    fn register(&self, index: u8) -> Option<u8> {
        let value = match index {
            REG_STATUS_A => STATUS_A,
            REG_STATUS_B => STATUS_B,
            REG_STATUS_C => STATUS_C,
            REG_STATUS_D => STATUS_D,
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
            | REG_YEAR | REG_CENTURY => {
                let now = self.date_time();
                let field = match index {
                    REG_SECONDS => u64::from(now.second),
                    REG_MINUTES => u64::from(now.minute),
                    REG_HOURS => u64::from(now.hour),
                    REG_WEEKDAY => u64::from(now.weekday),
                    REG_DAY => u64::from(now.day),
                    REG_MONTH => u64::from(now.month),
                    REG_YEAR => now.year % 100,
                    _ => now.year / 100,
                };
                to_bcd(field)
            }
            _ => return None,
        };
        Some(value)
    }
}

impl BusDevice for CmosRtc {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (DATA_OFFSET, 1) => {
                let cmos = self.cmos();
                let index = cmos.index;
                // The index is masked to 0..128 on write, so `get` always
                // finds the byte.
                self.register(index).unwrap_or_else(|| {
                    cmos.ram
                        .get(usize::from(index))
                        .copied()
                        .unwrap_or(FLOATING_BUS)
                })
            }
            _ => FLOATING_BUS,
        };
        data.fill(value);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (INDEX_OFFSET, &[index]) => self.cmos().index = index & INDEX_MASK,
            (DATA_OFFSET, &[value]) => {
                let mut cmos = self.cmos();
                let index = cmos.index;
                if self.register(index).is_none() {
                    if let Some(byte) = cmos.ram.get_mut(usize::from(index)) {
                        *byte = value;
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// 2026-11-29T13:45:07Z, a Sunday.
    const KNOWN_UNIX_SECONDS: u64 = 1_795_959_907;

    fn known_time() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(KNOWN_UNIX_SECONDS)
    }

    fn before_epoch() -> SystemTime {
        UNIX_EPOCH - Duration::from_secs(1)
    }

    fn read_cmos(rtc: &CmosRtc, index: u8) -> u8 {
        rtc.write(INDEX_OFFSET, &[index]);
        let mut data = [0u8; 1];
        rtc.read(DATA_OFFSET, &mut data);
        data[0]
    }

    fn write_cmos(rtc: &CmosRtc, index: u8, value: u8) {
        rtc.write(INDEX_OFFSET, &[index]);
        rtc.write(DATA_OFFSET, &[value]);
    }

    /// Month lengths by the Gregorian rules, written independently of
    /// `civil_from_days`.
    fn days_in_month(year: u64, month: u8) -> u8 {
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
        match month {
            2 if leap => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        }
    }

    #[test]
    fn civil_from_days_epoch_is_1970_01_01() {
        // Arrange / Act
        let date = civil_from_days(0);

        // Assert
        assert_eq!(date, (1970, 1, 1));
    }

    #[test]
    fn civil_from_days_leap_day_2000_is_feb_29() {
        // Arrange: 2000 is a leap year although divisible by 100 (by 400).
        let days = 11_016;

        // Act
        let date = civil_from_days(days);

        // Assert
        assert_eq!(date, (2000, 2, 29));
    }

    #[test]
    fn civil_from_days_known_dates_match() {
        // Arrange: days since the epoch, computed independently.
        let cases = [
            (10_956, (1999, 12, 31)),
            (20_786, (2026, 11, 29)),
            (24_855, (2038, 1, 19)),
            // 2100 is not a leap year: Feb 28 is followed by Mar 1.
            (47_540, (2100, 2, 28)),
            (47_541, (2100, 3, 1)),
            // The last day of a 400-year era.
            (157_113, (2400, 2, 29)),
        ];

        for (days, expected) in cases {
            // Act
            let date = civil_from_days(days);

            // Assert
            assert_eq!(date, expected, "days {days}");
        }
    }

    #[test]
    fn civil_from_days_every_day_follows_the_previous() {
        // Arrange: 1970 through 2400, which covers every leap-year rule.
        let last_day = 157_113;
        let mut previous = civil_from_days(0);

        for days in 1..=last_day {
            // Act
            let date = civil_from_days(days);

            // Assert: the next day of the month, or day 1 of the next month
            // (or year) right after the last day of the month.
            let (year, month, day) = previous;
            let month_ended = day == days_in_month(year, month);
            let valid = (!month_ended && date == (year, month, day + 1))
                || (month_ended && month < 12 && date == (year, month + 1, 1))
                || (month_ended && month == 12 && date == (year + 1, 1, 1));
            assert!(valid, "{previous:?} -> {date:?}");
            previous = date;
        }
    }

    #[test]
    fn weekday_from_days_known_dates_match() {
        // Arrange: 1970-01-01 was a Thursday (5), 2000-02-29 a Tuesday (3),
        // 2026-11-29 a Sunday (1).
        let cases = [(0, 5), (11_016, 3), (20_786, 1)];

        for (days, expected) in cases {
            // Act
            let weekday = weekday_from_days(days);

            // Assert
            assert_eq!(weekday, expected, "days {days}");
        }
    }

    #[test]
    fn to_bcd_two_digits_encode_as_nibbles() {
        // Arrange / Act / Assert
        assert_eq!(to_bcd(0), 0x00);
        assert_eq!(to_bcd(9), 0x09);
        assert_eq!(to_bcd(10), 0x10);
        assert_eq!(to_bcd(59), 0x59);
        // Only the last two digits are kept: year 2026 is "26".
        assert_eq!(to_bcd(2026), 0x26);
    }

    #[test]
    fn rtc_time_registers_read_host_time_in_bcd() {
        // Arrange
        let rtc = CmosRtc::with_clock(known_time);

        // Act
        let registers = [
            REG_SECONDS,
            REG_MINUTES,
            REG_HOURS,
            REG_WEEKDAY,
            REG_DAY,
            REG_MONTH,
            REG_YEAR,
            REG_CENTURY,
        ]
        .map(|index| read_cmos(&rtc, index));

        // Assert: 13:45:07, Sunday, 29/11/(20)26.
        assert_eq!(registers, [0x07, 0x45, 0x13, 0x01, 0x29, 0x11, 0x26, 0x20]);
    }

    #[test]
    fn rtc_host_clock_before_epoch_reads_epoch() {
        // Arrange
        let rtc = CmosRtc::with_clock(before_epoch);

        // Act
        let year = read_cmos(&rtc, REG_YEAR);
        let century = read_cmos(&rtc, REG_CENTURY);

        // Assert
        assert_eq!((century, year), (0x19, 0x70));
    }

    #[test]
    fn rtc_system_clock_reads_valid_bcd_seconds() {
        // Arrange
        let rtc = CmosRtc::new();

        // Act
        let seconds = read_cmos(&rtc, REG_SECONDS);

        // Assert: both nibbles are decimal digits and the value is below 60.
        assert!(seconds >> 4 < 6 && seconds & 0xf < 10, "{seconds:#x}");
    }

    #[test]
    fn rtc_status_registers_read_fixed_values() {
        // Arrange
        let rtc = CmosRtc::with_clock(known_time);

        // Act
        let status = [REG_STATUS_A, REG_STATUS_B, REG_STATUS_C, REG_STATUS_D]
            .map(|index| read_cmos(&rtc, index));

        // Assert
        assert_eq!(status, [0x26, 0x02, 0x00, 0x80]);
    }

    #[test]
    fn rtc_writes_to_time_and_status_registers_are_ignored() {
        // Arrange
        let rtc = CmosRtc::with_clock(known_time);

        // Act: try to make the clock 12-hour/binary and set the year to 99.
        write_cmos(&rtc, REG_STATUS_B, 0x04);
        write_cmos(&rtc, REG_YEAR, 0x99);

        // Assert
        assert_eq!(read_cmos(&rtc, REG_STATUS_B), STATUS_B);
        assert_eq!(read_cmos(&rtc, REG_YEAR), 0x26);
    }

    #[test]
    fn rtc_cmos_ram_round_trips() {
        // Arrange: 0x10 (floppy types on a PC) and 0x7f (last byte) are RAM.
        let rtc = CmosRtc::with_clock(known_time);
        let initially = read_cmos(&rtc, 0x10);

        // Act
        write_cmos(&rtc, 0x10, 0xab);
        write_cmos(&rtc, 0x7f, 0xcd);

        // Assert
        assert_eq!(initially, 0);
        assert_eq!(read_cmos(&rtc, 0x10), 0xab);
        assert_eq!(read_cmos(&rtc, 0x7f), 0xcd);
    }

    #[test]
    fn rtc_index_nmi_bit_is_masked() {
        // Arrange
        let rtc = CmosRtc::with_clock(known_time);
        write_cmos(&rtc, 0x10, 0xab);
        // Bit 7 set: "disable NMI" plus index 0x10.
        let nmi_masked_index = 0x80 | 0x10;

        // Act
        let value = read_cmos(&rtc, nmi_masked_index);

        // Assert
        assert_eq!(value, 0xab);
    }

    #[test]
    fn rtc_hostile_accesses_read_ff_and_ignore_writes() {
        // Arrange
        let rtc = CmosRtc::with_clock(known_time);
        write_cmos(&rtc, 0x10, 0xab);
        let mut index_port = [0u8; 1];
        let mut wide = [0u8; 8];
        let mut far = [0u8; 1];

        // Act: the write-only index port, an 8-byte access, an empty access,
        // an out-of-range offset, and writes of the same shapes.
        rtc.read(INDEX_OFFSET, &mut index_port);
        rtc.read(DATA_OFFSET, &mut wide);
        rtc.read(DATA_OFFSET, &mut []);
        rtc.read(u64::MAX, &mut far);
        rtc.write(DATA_OFFSET, &[1, 2, 3, 4, 5, 6, 7, 8]);
        rtc.write(DATA_OFFSET, &[]);
        rtc.write(100, &[0]);

        // Assert
        assert_eq!(index_port, [0xff]);
        assert_eq!(wide, [0xff; 8]);
        assert_eq!(far, [0xff]);
        assert_eq!(read_cmos(&rtc, 0x10), 0xab);
    }
}
