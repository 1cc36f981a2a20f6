//! Every op of the core's op set on the Vulkan device against `ReferenceDevice`: the op test cases every
//! backend runs (`sd3_core::testing::cases`), one test each. Skips, with the reason printed, only on a machine
//! without a Vulkan loader or device.

mod common;

sd3_core::backend_tests!(common::device());
