//! Not part of the old-style crate's own tests: checks that the runtime's
//! startup check accepts its two-step registrations, whose names agree.

use sink_example_old_style as _;

#[test]
fn agreeing_two_step_registrations_pass_the_startup_check() {
    assert_eq!(sink_api::check_registrations(), Ok(()));
    let names: Vec<&str> = sink_api::registered_stages().map(|s| s.name).collect();
    assert_eq!(names, ["old_style_at_least", "old_style_names"]);
}
