//! newt patch: work launched outside CubeCL's compiler — a cuBLASLt call — queued in order with
//! CubeCL's kernels on the CUDA stream they use, without blocking the launching thread.
//!
//! [`launch_external`] queues a closure for the client's stream and launches a marker kernel
//! with the buffers the closure needs. When the device thread reaches the marker (after every
//! kernel launched before it), it resolves the buffers to device pointers and runs the closure
//! with them and the stream, instead of compiling anything.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use cubecl_common::backtrace::BackTrace;
use cubecl_core::ir::{ElemType, StorageType, UIntKind};
use cubecl_core::prelude::*;
use cubecl_core::server::{Binding, KernelArguments, MetadataBindingInfo};
use cubecl_runtime::compiler::{CompilationError, CubeTask};
use cubecl_runtime::id::KernelId;
use cubecl_runtime::kernel::{CompiledKernel, KernelMetadata};

use crate::{CudaCompiler, CudaRuntime};

/// Work for the device thread: the device pointers of the launch's buffers (in order) and the
/// CUDA stream to queue on.
pub type ExternalFn = Box<dyn FnOnce(&[u64], cudarc::driver::sys::CUstream) + Send>;

/// Queued work by ticket; the ticket travels in the marker launch's metadata.
static PENDING: Mutex<Option<HashMap<u64, ExternalFn>>> = Mutex::new(None);
static NEXT_TICKET: AtomicU64 = AtomicU64::new(0);

/// The marker kernel; never compiled.
struct ExternalKernel;

impl KernelMetadata for ExternalKernel {
    fn id(&self) -> KernelId {
        KernelId::new::<Self>()
    }

    fn address_type(&self) -> StorageType {
        StorageType::Scalar(ElemType::UInt(UIntKind::U32))
    }
}

impl CubeTask<CudaCompiler> for ExternalKernel {
    fn compile(
        &self,
        _compiler: &mut CudaCompiler,
        _options: &<CudaCompiler as cubecl_core::Compiler>::CompilationOptions,
        _mode: cubecl_core::ExecutionMode,
        _address_type: StorageType,
    ) -> Result<CompiledKernel<CudaCompiler>, CompilationError> {
        Err(CompilationError::Generic {
            reason: "an external call is run by the server, not compiled".into(),
            backtrace: BackTrace::capture(),
        })
    }
}

/// Queues `work` on `client`'s stream, after everything launched before it, with the device
/// pointers of `buffers`.
pub fn launch_external(client: &ComputeClient<CudaRuntime>, buffers: Vec<Binding>, work: ExternalFn) {
    let ticket = NEXT_TICKET.fetch_add(1, Ordering::Relaxed);
    PENDING.lock().unwrap().get_or_insert_with(HashMap::new).insert(ticket, work);
    client.launch(
        Box::new(ExternalKernel),
        CubeCount::Static(1, 1, 1),
        KernelArguments::new()
            .with_buffers(buffers)
            .with_info(MetadataBindingInfo::custom(vec![ticket])),
    );
}

pub(crate) fn is_external(name: &str) -> bool {
    name == core::any::type_name::<ExternalKernel>()
}

pub(crate) fn run_external(info: &[u64], ptrs: &[u64], stream: cudarc::driver::sys::CUstream) {
    let work = info
        .first()
        .and_then(|ticket| PENDING.lock().unwrap().as_mut().and_then(|p| p.remove(ticket)))
        .expect("an external call was queued under this ticket");
    work(ptrs, stream);
}
