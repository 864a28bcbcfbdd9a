//! Can this host run guests natively? (used by `ironvmm doctor` and before `boot`)
