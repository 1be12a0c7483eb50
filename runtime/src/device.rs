//! CUDA device discovery that never panics.
//!
//! cudarc's `CudaContext::new` panics when `libcuda` cannot be loaded, so discovery goes through the
//! driver in three guarded steps: is the driver library present at all (`is_culib_present`), does
//! `cuInit` succeed and report at least one device, then per device: name, compute capability and
//! memory. No context is created: `v3r doctor` stays cheap and leaves the GPU untouched.
//!
//! Not handled here: choosing a device for a session (the session API takes an ordinal), MIG
//! instances (reported as whatever the driver lists).

use std::fmt;

use cudarc::driver::{result, sys};

/// Why no CUDA device can be used. Each variant's message is one line a user can act on.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DeviceError {
    #[error("no CUDA driver found (libcuda could not be loaded); GPU commands need an NVIDIA driver")]
    NoDriver,
    #[error("CUDA driver found but it failed to initialize: {0}")]
    DriverInit(String),
    #[error("no CUDA device: the driver (version {driver}) reports 0 devices")]
    NoDevice { driver: DriverVersion },
    #[error("CUDA device {ordinal}: cannot read {what}: {cause}")]
    Query { ordinal: usize, what: &'static str, cause: String },
    #[error("CUDA device {ordinal} does not exist: the driver reports {count} device(s)")]
    NoSuchOrdinal { ordinal: usize, count: usize },
}

/// A CUDA driver version as the driver API encodes it (1000 * major + 10 * minor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriverVersion(pub i32);

impl fmt::Display for DriverVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.0 / 1000, (self.0 % 1000) / 10)
    }
}

/// What the driver says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverInfo {
    /// The highest CUDA version the installed driver supports.
    pub version: DriverVersion,
}

/// One CUDA device, as reported by the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability (major, minor); Hopper is (9, 0).
    pub compute_capability: (i32, i32),
    pub total_memory_bytes: usize,
    pub multiprocessors: i32,
}

impl DeviceInfo {
    /// The `sm_XY` name of this device's architecture (without the `a` suffix of arch-specific PTX).
    pub fn sm_name(&self) -> String {
        format!("sm_{}{}", self.compute_capability.0, self.compute_capability.1)
    }
}

impl fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cuda:{} {} (compute capability {}.{}, {}, {:.1} GiB, {} SMs)",
            self.ordinal,
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.sm_name(),
            self.total_memory_bytes as f64 / (1u64 << 30) as f64,
            self.multiprocessors
        )
    }
}

fn driver_error(e: result::DriverError) -> String {
    // DriverError's Debug names the CUresult (e.g. CUDA_ERROR_NO_DEVICE); its Display adds the text.
    format!("{e} ({:?})", e.0)
}

/// Loads the driver and returns its version, or why it cannot be used.
pub fn probe_driver() -> Result<DriverInfo, DeviceError> {
    // SAFETY: only tries to dlopen libcuda under its usual names; no symbol is called.
    if !unsafe { sys::is_culib_present() } {
        return Err(DeviceError::NoDriver);
    }
    result::init().map_err(|e| DeviceError::DriverInit(driver_error(e)))?;
    let mut version: std::ffi::c_int = 0;
    // SAFETY: the library is loaded and initialized; the out pointer is a valid c_int.
    let status = unsafe { sys::cuDriverGetVersion(&mut version) };
    if status != sys::CUresult::CUDA_SUCCESS {
        return Err(DeviceError::DriverInit(format!("cuDriverGetVersion returned {status:?}")));
    }
    Ok(DriverInfo { version: DriverVersion(version) })
}

/// Every device the driver lists, with name, compute capability and memory.
///
/// Errors: [`DeviceError::NoDriver`] when libcuda is absent, [`DeviceError::NoDevice`] when the
/// driver works but lists nothing, [`DeviceError::Query`] when a device cannot be read.
pub fn probe_devices() -> Result<(DriverInfo, Vec<DeviceInfo>), DeviceError> {
    let driver = probe_driver()?;
    let count = result::device::get_count().map_err(|e| DeviceError::DriverInit(driver_error(e)))?;
    if count <= 0 {
        return Err(DeviceError::NoDevice { driver: driver.version });
    }
    let devices = (0..count as usize).map(query_device).collect::<Result<Vec<_>, _>>()?;
    Ok((driver, devices))
}

/// The device at `ordinal`, or why it cannot be had.
pub fn probe_device(ordinal: usize) -> Result<DeviceInfo, DeviceError> {
    let (_, devices) = probe_devices()?;
    let count = devices.len();
    devices.into_iter().nth(ordinal).ok_or(DeviceError::NoSuchOrdinal { ordinal, count })
}

fn query_device(ordinal: usize) -> Result<DeviceInfo, DeviceError> {
    let q =
        |what: &'static str| move |e: result::DriverError| DeviceError::Query { ordinal, what, cause: driver_error(e) };
    let dev = result::device::get(ordinal as i32).map_err(q("handle"))?;
    let name = result::device::get_name(dev).map_err(q("name"))?;
    let attr = |a: sys::CUdevice_attribute, what: &'static str| {
        // SAFETY: `dev` is a valid device handle from cuDeviceGet.
        unsafe { result::device::get_attribute(dev, a) }.map_err(q(what))
    };
    use sys::CUdevice_attribute::*;
    let major = attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, "compute capability")?;
    let minor = attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, "compute capability")?;
    let multiprocessors = attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, "multiprocessor count")?;
    // SAFETY: as above.
    let total_memory_bytes = unsafe { result::device::total_mem(dev) }.map_err(q("total memory"))?;
    Ok(DeviceInfo { ordinal, name, compute_capability: (major, minor), total_memory_bytes, multiprocessors })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_version_prints_major_minor() {
        assert_eq!(DriverVersion(13000).to_string(), "13.0");
        assert_eq!(DriverVersion(12080).to_string(), "12.8");
    }

    #[test]
    fn probing_never_panics_and_errors_are_one_line() {
        match probe_devices() {
            Ok((driver, devices)) => {
                assert!(!devices.is_empty());
                assert!(driver.version.0 > 0);
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(!msg.contains('\n'), "multi-line error: {msg}");
                assert!(msg.starts_with("no CUDA") || msg.starts_with("CUDA"), "{msg}");
            }
        }
    }

    #[test]
    fn device_info_display_names_the_architecture() {
        let d = DeviceInfo {
            ordinal: 0,
            name: "NVIDIA H200".into(),
            compute_capability: (9, 0),
            total_memory_bytes: 150_000_000_000,
            multiprocessors: 132,
        };
        assert_eq!(d.sm_name(), "sm_90");
        assert_eq!(d.to_string(), "cuda:0 NVIDIA H200 (compute capability 9.0, sm_90, 139.7 GiB, 132 SMs)");
    }
}
