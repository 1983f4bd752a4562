//! The run-observer seam: everything that wants to hear of group runs and units as they
//! start and end — metrics, the audit trail, the state (advancing handled SHAs, keeping
//! pending ones), commit statuses and notifications (`crate::report`).
//!
//! Observers are told, they do not decide: a [`RunObserver`] cannot change what is
//! deployed or when. Calls are synchronous and made from the deploying task, so an
//! observer must be quick (record, or hand the work to a task of its own) and must not
//! block. `watch` and `trigger` build their lists from the same observers.

use std::sync::Arc;

use super::{GroupResult, Trigger, Unit, UnitResult};
use crate::forge::Sha;

/// Which group run an event belongs to.
#[derive(Debug, Clone, Copy)]
pub struct RunRef<'a> {
    pub group: &'a str,
    pub run_id: &'a str,
    pub trigger: &'a Trigger,
}

/// Hears of runs and units. Every method has an empty default, so an observer implements
/// only what it needs.
pub trait RunObserver: Send + Sync {
    /// A group run is about to start its units (given in configuration order).
    fn group_started(&self, _run: RunRef<'_>, _units: &[Unit]) {}
    /// A unit got its slot and is about to be checked out and run.
    fn unit_started(&self, _run: RunRef<'_>, _unit: &Unit) {}
    /// A unit ended with any status, including skipped, cancelled and never started.
    fn unit_ended(&self, _run: RunRef<'_>, _result: &UnitResult) {}
    /// Every unit of the run has ended and been reported.
    fn group_ended(&self, _result: &GroupResult) {}
    /// A unit that was queued or deferred in `group` will never run: a newer commit of
    /// the same branch (`by`) took its place. Called by the scheduler, outside any run.
    fn unit_superseded(&self, _group: &str, _unit: &Unit, _by: &Sha) {}
}

/// An ordered list of observers, itself an observer; cheap to clone.
#[derive(Clone, Default)]
pub struct Observers(Arc<[Arc<dyn RunObserver>]>);

impl Observers {
    pub fn new(list: Vec<Arc<dyn RunObserver>>) -> Observers {
        Observers(list.into())
    }

    /// This list with `observer` added at the end.
    pub fn with(&self, observer: Arc<dyn RunObserver>) -> Observers {
        let mut list: Vec<Arc<dyn RunObserver>> = self.0.to_vec();
        list.push(observer);
        Observers(list.into())
    }
}

impl RunObserver for Observers {
    fn group_started(&self, run: RunRef<'_>, units: &[Unit]) {
        self.0.iter().for_each(|o| o.group_started(run, units));
    }

    fn unit_started(&self, run: RunRef<'_>, unit: &Unit) {
        self.0.iter().for_each(|o| o.unit_started(run, unit));
    }

    fn unit_ended(&self, run: RunRef<'_>, result: &UnitResult) {
        self.0.iter().for_each(|o| o.unit_ended(run, result));
    }

    fn group_ended(&self, result: &GroupResult) {
        self.0.iter().for_each(|o| o.group_ended(result));
    }

    fn unit_superseded(&self, group: &str, unit: &Unit, by: &Sha) {
        self.0
            .iter()
            .for_each(|o| o.unit_superseded(group, unit, by));
    }
}

impl std::fmt::Debug for Observers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Observers({})", self.0.len())
    }
}
