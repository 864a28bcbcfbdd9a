//! See lib.rs for this module's place in the data flow.
