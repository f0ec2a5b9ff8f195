//! Plans whose tables of contents of objects are checked during the execution
//! (`PlanOptions::defer_toc_checks`), and the fall back to a plan that checked them first.
//!
//! Of the `.ckpt` objects of one size in a store, one is walked and the others take its table of
//! contents; deferred, their check rides on the copy's own GETs instead of ~141 small GETs per
//! object before the plan (`reshard_core::toc_predict`). An object that differs fails the
//! execution with `Error::PredictionMismatch` before any output read from it is committed; the
//! plan is then made again with every table of contents checked first, and executed again,
//! writing every output anew: an output committed before the mismatch read no byte of that
//! object, but the plan it was made from rests on every table of contents (which parameters a
//! rank holds, where a tensor that is in no strategy is read from), so none is kept.

use reshard_core::plan::Plan;
use reshard_core::Error;

/// The plan made by `make(defer)`. An error of a plan with deferred checks is not trusted (a
/// table of contents taken from a sibling may be what made it fail): the plan is made again
/// without deferring, and that one's answer stands.
pub(crate) fn plan(defer: bool, make: impl Fn(bool) -> Result<Plan, Error>) -> Result<Plan, Error> {
    let before = reshard_core::toc_predict::deferred().0;
    match make(defer) {
        Err(_) if defer && reshard_core::toc_predict::deferred().0 > before => make(false),
        r => r,
    }
}

/// `run(plan, true)`; when an object's deferred check fails, says so on stderr, makes the plan
/// again with `replan` (every table of contents checked first) and runs that one with
/// `run(plan, false)`: without resuming (`ExecuteOptions::resume`) from outputs the first run
/// committed.
pub(crate) fn on_mismatch<T>(
    plan: &Plan,
    replan: impl FnOnce() -> Result<Plan, Error>,
    run: impl Fn(&Plan, bool) -> Result<T, Error>,
) -> Result<T, Error> {
    match run(plan, true) {
        Err(e @ Error::PredictionMismatch { .. }) => {
            eprintln!(
                "reshard: warning: {e}; planning again with every table of contents checked first, \
                 and writing every output again"
            );
            run(&replan()?, false)
        }
        r => r,
    }
}
