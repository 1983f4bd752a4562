//! The library surface for the integration tests (`tests/it`), the benchmarks
//! (`benches/`) and the fuzz targets (`fuzz/`): exactly the types they drive, re-exported in one place. Nothing else of
//! the crate is public; a new test that needs more adds it here, on purpose.

pub use crate::build_info::VERSION;
pub use crate::config::{Config, Env, Repository, load_str};
pub use crate::deploy::checkout::{CloneRequest, clone_blocking};
pub use crate::deploy::{
    DeployOptions, Deployer, GroupResult, GroupRun, Observers, RunObserver, RunRef, Trigger, Unit,
    UnitResult, UnitStatus,
};
pub use crate::forge::kind::hmac_sha256_valid;
pub use crate::forge::{ForgeError, ForgeEvents, Forges, Observation, Sha};
pub use crate::monitor::scheduler::Scheduler;
pub use crate::monitor::state::StateStore;
pub use crate::monitor::{Health, Monitor, Scope};
pub use crate::server::{AppState, router};
pub use crate::shutdown::Shutdown;
pub use crate::telemetry::metrics::Metrics;
