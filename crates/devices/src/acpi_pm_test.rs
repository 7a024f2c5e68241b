use std::sync::{Arc, Mutex};
use std::time::Duration;

use alioth_mem::BusDevice;

use super::*;

fn device() -> (AcpiPm, Arc<Mutex<Vec<VmEvent>>>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let log = events.clone();
    (
        AcpiPm::new(Arc::new(move |e| log.lock().unwrap().push(e))),
        events,
    )
}

fn timer(pm: &AcpiPm) -> u32 {
    let mut v = [0u8; 4];
    pm.read(u64::from(TIMER_OFFSET), &mut v);
    u32::from_le_bytes(v)
}

#[test]
fn pm_timer_counts_at_its_frequency() {
    let (pm, _) = device();
    let start = std::time::Instant::now();
    let t0 = timer(&pm);
    std::thread::sleep(Duration::from_millis(20));
    let t1 = timer(&pm);
    let elapsed = start.elapsed();
    let ticks = u64::from(t1.wrapping_sub(t0));
    // At least the 20 ms slept, at most the time that really passed (plus a tick).
    assert!(ticks >= TIMER_HZ * 20 / 1000, "{ticks} ticks in 20 ms");
    assert!(
        ticks <= (elapsed.as_nanos() * u128::from(TIMER_HZ) / 1_000_000_000) as u64 + 1,
        "{ticks} ticks in {elapsed:?}"
    );
}

#[test]
fn pm_timer_bytes_read_separately_form_the_counter() {
    let (pm, _) = device();
    std::thread::sleep(Duration::from_millis(5));
    let mut hi = [0u8; 2];
    pm.read(u64::from(TIMER_OFFSET) + 2, &mut hi);
    let whole = timer(&pm);
    // The upper half moves every ~18 ms; it matches the whole read or is one behind.
    let upper = u32::from(u16::from_le_bytes(hi));
    assert!(whole >> 16 == upper || whole >> 16 == upper + 1);
}

#[test]
fn sleep_control_s5_powers_off_and_other_types_do_not() {
    let (pm, events) = device();
    pm.write(0, &[(3 << 2) | SLP_EN]);
    assert!(events.lock().unwrap().is_empty());
    pm.write(0, &[S5_SLP_TYP << 2]);
    assert!(events.lock().unwrap().is_empty(), "no SLP_EN");
    pm.write(0, &[(S5_SLP_TYP << 2) | SLP_EN]);
    assert_eq!(*events.lock().unwrap(), vec![VmEvent::PowerOff]);
}

#[test]
fn reset_register_resets_only_with_its_value() {
    let (pm, events) = device();
    pm.write(2, &[RESET_VALUE.wrapping_add(1)]);
    assert!(events.lock().unwrap().is_empty());
    pm.write(2, &[RESET_VALUE]);
    assert_eq!(*events.lock().unwrap(), vec![VmEvent::Reset]);
}
