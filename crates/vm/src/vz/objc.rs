//! The [`Framework`] seam over Virtualization.framework via `objc2-virtualization` (macOS).
//!
//! This is the only module of the crate with Objective-C `unsafe`. It makes no decisions:
//! the configuration is copied from a [`VzPlan`], and every method is one framework call.
//!
//! Threading: each VM gets its own serial dispatch queue, passed to
//! `initWithConfiguration:queue:`. Every call on the `VZVirtualMachine` (and on its socket
//! device) is made on that queue through [`run_on`] (synchronous, for quick calls like
//! `state`) or inside [`AppleMachine::completion`], which submits the call and awaits its
//! completion handler through a tokio oneshot channel. The framework invokes completion
//! handlers and the vsock listener delegate on the same queue. Objective-C objects are held
//! in [`QueueBound`] wrappers, which are `Send`/`Sync` only because of that discipline, and are
//! released on the queue when the machine is dropped.
//!
//! Not run on a Mac by this project's CI: compile- and lint-checked for
//! `aarch64-apple-darwin` and `x86_64-apple-darwin` only.

use std::io;
use std::os::fd::{BorrowedFd, IntoRawFd, OwnedFd};
use std::path::Path;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use block2::{DynBlock, RcBlock};
use dispatch2::{DispatchQueue, DispatchRetained};
use objc2::rc::Retained;
use objc2::runtime::{NSObject, NSObjectProtocol, ProtocolObject};
use objc2::{define_class, msg_send, sel, AllocAnyThread, ClassType, DefinedClass, Message};
use objc2_foundation::{NSArray, NSError, NSFileHandle, NSString, NSURL};
use objc2_virtualization::{
    VZDiskImageStorageDeviceAttachment, VZEntropyDeviceConfiguration,
    VZFileHandleSerialPortAttachment, VZLinuxBootLoader, VZNATNetworkDeviceAttachment,
    VZNetworkDeviceConfiguration, VZSerialPortConfiguration, VZSocketDeviceConfiguration,
    VZStorageDeviceConfiguration, VZVirtioBlockDeviceConfiguration,
    VZVirtioConsoleDeviceSerialPortConfiguration, VZVirtioEntropyDeviceConfiguration,
    VZVirtioNetworkDeviceConfiguration, VZVirtioSocketConnection, VZVirtioSocketDevice,
    VZVirtioSocketDeviceConfiguration, VZVirtioSocketListener, VZVirtioSocketListenerDelegate,
    VZVirtualMachine, VZVirtualMachineConfiguration, VZVirtualMachineState,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};

use super::channel::stream_from_fd;
use super::framework::{classify, Framework, FwError, FwMachine, FwState};
use super::plan::{VzLimits, VzPlan};
use super::vm::VzBackend;
use crate::agent::AgentStream;
use crate::config::Arch;

/// Longest wait for a completion handler before the call is reported as hung.
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(60);

/// The backend on this Mac's Virtualization.framework.
pub fn apple_backend() -> VzBackend<AppleFramework> {
    VzBackend::new(AppleFramework, Arch::host())
}

/// The framework backends of this OS, for [`crate::select::backends`].
pub fn native_backends() -> Vec<Box<dyn crate::Backend>> {
    vec![Box::new(apple_backend())]
}

/// Virtualization.framework of this process.
#[derive(Debug, Default, Clone, Copy)]
pub struct AppleFramework;

/// A value that may only be used on one VM's serial dispatch queue (or moved there).
struct QueueBound<T>(T);

// SAFETY: a `QueueBound` is only dereferenced inside closures that run on the owning VM's
// serial queue (`run_on`, `exec_async`), or while the submitting thread blocks in
// `exec_sync`; the queue serialises those uses, so the wrapped Objective-C objects are never
// used from two threads at once. Moving the wrapper between threads only moves a pointer.
unsafe impl<T> Send for QueueBound<T> {}
// SAFETY: as above; shared references are likewise only used on the serial queue.
unsafe impl<T> Sync for QueueBound<T> {}

impl<T> QueueBound<T> {
    /// Takes the value out (a method, so closures capture the whole wrapper).
    fn into_inner(self) -> T {
        self.0
    }
    fn get(&self) -> &T {
        &self.0
    }
}

/// Runs `f` on `queue` and waits for its result. Never call it from that queue.
fn run_on<R>(queue: &DispatchQueue, f: impl FnOnce() -> R) -> Option<R> {
    let mut out: Option<R> = None;
    let slot = QueueBound(&mut out);
    let job = QueueBound(f);
    queue.exec_sync(move || {
        let slot = slot.into_inner();
        *slot = Some((job.into_inner())());
    });
    out
}

fn ns_error(op: &'static str, e: &NSError) -> FwError {
    let description = e.localizedDescription().to_string();
    let reason = e.localizedFailureReason().map(|r| r.to_string());
    classify(op, e.code() as i64, &description, reason.as_deref())
}

fn file_url(path: &Path) -> Result<Retained<NSURL>, FwError> {
    let s = path.to_str().ok_or_else(|| FwError::Host {
        what: format!("use {} with Virtualization.framework", path.display()),
        source: io::Error::new(io::ErrorKind::InvalidInput, "the path is not UTF-8"),
    })?;
    Ok(NSURL::fileURLWithPath(&NSString::from_str(s)))
}

fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Framework for AppleFramework {
    type Machine = AppleMachine;

    fn limits(&self) -> Result<VzLimits, FwError> {
        // SAFETY: a class property without arguments; documented as callable from any thread.
        if !unsafe { VZVirtualMachine::isSupported() } {
            return Err(FwError::NotAvailable(
                "VZVirtualMachine.isSupported is false: no hardware virtualization (nested VM or disabled)".into(),
            ));
        }
        // SAFETY: class properties without arguments, readable from any thread.
        let (min_cpus, max_cpus, min_mem, max_mem) = unsafe {
            (
                VZVirtualMachineConfiguration::minimumAllowedCPUCount(),
                VZVirtualMachineConfiguration::maximumAllowedCPUCount(),
                VZVirtualMachineConfiguration::minimumAllowedMemorySize(),
                VZVirtualMachineConfiguration::maximumAllowedMemorySize(),
            )
        };
        Ok(VzLimits {
            min_cpus: saturating_u32(min_cpus),
            max_cpus: saturating_u32(max_cpus),
            min_memory_bytes: min_mem,
            max_memory_bytes: max_mem,
        })
    }

    fn save_restore_support(&self) -> Result<(), String> {
        // The selectors exist from macOS 14 on; asking the runtime avoids parsing versions.
        if VZVirtualMachine::class().responds_to(sel!(saveMachineStateToURL:completionHandler:)) {
            Ok(())
        } else {
            Err("saving and restoring VM state needs macOS 14 or later".into())
        }
    }

    fn build(&self, plan: &VzPlan) -> Result<AppleMachine, FwError> {
        let config = configuration(plan)?;
        // SAFETY: `config` is fully built and only used on this thread.
        unsafe { config.validateWithError() }
            .map_err(|e| ns_error("validate the VM configuration", &e))?;
        let queue = DispatchQueue::new("dev.vmcp.vz.vm", None);
        let (tx, rx) = mpsc::unbounded_channel();
        let delegate = ListenerDelegate::new(tx);
        let port = plan.agent_port;
        let config = QueueBound(config);
        let delegate_ref = QueueBound(delegate.clone());
        let queue_ref = QueueBound(queue.clone());
        let objects = run_on(&queue, move || -> Result<Objects, FwError> {
            let config = config.into_inner();
            let delegate = delegate_ref.into_inner();
            let queue = queue_ref.into_inner();
            // SAFETY: runs on `queue`, the VM's own serial queue, with a validated
            // configuration that the initialiser copies.
            let vm = unsafe {
                VZVirtualMachine::initWithConfiguration_queue(
                    VZVirtualMachine::alloc(),
                    &config,
                    &queue,
                )
            };
            // SAFETY: property read on the VM's queue.
            let devices = unsafe { vm.socketDevices() };
            let device = devices
                .firstObject()
                .and_then(|d| d.downcast::<VZVirtioSocketDevice>().ok())
                .ok_or_else(|| FwError::Failed {
                    op: "set up the agent channel",
                    message: "the VM has no virtio socket device".into(),
                })?;
            // SAFETY: a fresh listener object; setting its delegate and registering it on
            // the VM's socket device happen on the VM's queue. The listener keeps only a weak
            // reference to the delegate, which `Objects` keeps alive.
            let listener = unsafe {
                let listener = VZVirtioSocketListener::new();
                listener.setDelegate(Some(ProtocolObject::from_ref(&*delegate)));
                device.setSocketListener_forPort(&listener, port);
                listener
            };
            Ok(Objects {
                vm,
                _listener: listener,
                _delegate: delegate,
            })
        })
        .ok_or_else(|| FwError::Failed {
            op: "create the VM",
            message: "its dispatch queue did not run the call".into(),
        })??;
        Ok(AppleMachine {
            queue,
            objects: Some(QueueBound(objects)),
            conns: tokio::sync::Mutex::new(rx),
        })
    }
}

/// Copies `plan` into a new `VZVirtualMachineConfiguration`.
fn configuration(plan: &VzPlan) -> Result<Retained<VZVirtualMachineConfiguration>, FwError> {
    let kernel = file_url(&plan.kernel)?;
    let initrd = file_url(&plan.initrd)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&plan.console_log)
        .map_err(|source| FwError::Host {
            what: format!("open console log {}", plan.console_log.display()),
            source,
        })?;
    // The file handle closes the descriptor when the configuration and VM release it.
    let log = NSFileHandle::initWithFileDescriptor_closeOnDealloc(
        NSFileHandle::alloc(),
        log.into_raw_fd(),
        true,
    );
    let mut disks = Vec::new();
    for d in plan.rootfs.iter().chain(plan.disks.iter()) {
        let url = file_url(&d.path)?;
        // SAFETY: initialiser with a file URL; errors come back as NSError.
        let attachment = unsafe {
            VZDiskImageStorageDeviceAttachment::initWithURL_readOnly_error(
                VZDiskImageStorageDeviceAttachment::alloc(),
                &url,
                d.read_only,
            )
        }
        .map_err(|e| ns_error("attach a disk image", &e))?;
        disks.push(attachment);
    }
    // SAFETY: plain initialisers and setters on objects created here and held only by this
    // function; nothing is shared with the framework until a VM copies the configuration.
    let config = unsafe {
        let boot = VZLinuxBootLoader::initWithKernelURL(VZLinuxBootLoader::alloc(), &kernel);
        boot.setInitialRamdiskURL(Some(&initrd));
        boot.setCommandLine(&NSString::from_str(&plan.cmdline));

        let config = VZVirtualMachineConfiguration::new();
        config.setBootLoader(Some(boot.as_super()));
        config.setCPUCount(plan.cpus as usize);
        config.setMemorySize(plan.memory_bytes);

        let console = VZVirtioConsoleDeviceSerialPortConfiguration::new();
        let attachment =
            VZFileHandleSerialPortAttachment::initWithFileHandleForReading_fileHandleForWriting(
                VZFileHandleSerialPortAttachment::alloc(),
                None,
                Some(&log),
            );
        console.setAttachment(Some(attachment.as_super()));
        let ports: [Retained<VZSerialPortConfiguration>; 1] = [Retained::into_super(console)];
        config.setSerialPorts(&NSArray::from_retained_slice(&ports));

        let entropy: [Retained<VZEntropyDeviceConfiguration>; 1] = [Retained::into_super(
            VZVirtioEntropyDeviceConfiguration::new(),
        )];
        config.setEntropyDevices(&NSArray::from_retained_slice(&entropy));

        let socket: [Retained<VZSocketDeviceConfiguration>; 1] = [Retained::into_super(
            VZVirtioSocketDeviceConfiguration::new(),
        )];
        config.setSocketDevices(&NSArray::from_retained_slice(&socket));

        if !disks.is_empty() {
            // In order: the guest sees them as /dev/vda, /dev/vdb, ...
            let blocks: Vec<Retained<VZStorageDeviceConfiguration>> = disks
                .iter()
                .map(|attachment| {
                    Retained::into_super(VZVirtioBlockDeviceConfiguration::initWithAttachment(
                        VZVirtioBlockDeviceConfiguration::alloc(),
                        attachment.as_super(),
                    ))
                })
                .collect();
            config.setStorageDevices(&NSArray::from_retained_slice(&blocks));
        }

        if plan.network {
            let net = VZVirtioNetworkDeviceConfiguration::new();
            let nat = VZNATNetworkDeviceAttachment::new();
            net.setAttachment(Some(nat.as_super()));
            let nets: [Retained<VZNetworkDeviceConfiguration>; 1] = [Retained::into_super(net)];
            config.setNetworkDevices(&NSArray::from_retained_slice(&nets));
        }
        config
    };
    Ok(config)
}

/// What one framework VM keeps alive.
struct Objects {
    vm: Retained<VZVirtualMachine>,
    _listener: Retained<VZVirtioSocketListener>,
    _delegate: Retained<ListenerDelegate>,
}

/// A guest connection: the duplicated descriptor and the connection object that owns the
/// original (kept alive as long as the stream, as the framework asks).
type Incoming = io::Result<(OwnedFd, QueueBound<Retained<VZVirtioSocketConnection>>)>;

/// Ivars of [`ListenerDelegate`].
struct DelegateIvars {
    conns: mpsc::UnboundedSender<Incoming>,
}

define_class!(
    // SAFETY: NSObject has no subclassing requirements, and ListenerDelegate does not
    // implement Drop (its ivars are dropped by objc2).
    #[unsafe(super(NSObject))]
    #[name = "VmcpVsockListenerDelegate"]
    #[ivars = DelegateIvars]
    struct ListenerDelegate;

    // SAFETY: NSObjectProtocol has no extra requirements.
    unsafe impl NSObjectProtocol for ListenerDelegate {}

    // SAFETY: the method below has the protocol's selector and argument types.
    unsafe impl VZVirtioSocketListenerDelegate for ListenerDelegate {
        #[unsafe(method(listener:shouldAcceptNewConnection:fromSocketDevice:))]
        fn should_accept(
            &self,
            _listener: &VZVirtioSocketListener,
            connection: &VZVirtioSocketConnection,
            _device: &VZVirtioSocketDevice,
        ) -> bool {
            self.ivars().conns.send(take_connection(connection)).is_ok()
        }
    }
);

impl ListenerDelegate {
    fn new(conns: mpsc::UnboundedSender<Incoming>) -> Retained<Self> {
        let this = Self::alloc().set_ivars(DelegateIvars { conns });
        // SAFETY: NSObject's designated initialiser on a freshly allocated object.
        unsafe { msg_send![super(this), init] }
    }
}

/// Duplicates the connection's descriptor (called on the VM queue by the delegate).
fn take_connection(connection: &VZVirtioSocketConnection) -> Incoming {
    // SAFETY: property read on a live connection, on the VM's queue (delegate callback).
    let fd = unsafe { connection.fileDescriptor() };
    if fd < 0 {
        return Err(io::Error::other("the vsock connection has no descriptor"));
    }
    // SAFETY: `fd` is open and owned by `connection`, which outlives this borrow.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let owned = borrowed.try_clone_to_owned()?;
    Ok((owned, QueueBound(connection.retain())))
}

/// The agent stream over a vsock connection.
struct VsockStream {
    stream: tokio::net::UnixStream,
    _connection: QueueBound<Retained<VZVirtioSocketConnection>>,
}

impl AsyncRead for VsockStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for VsockStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// One `VZVirtualMachine` with its queue and vsock listener.
pub struct AppleMachine {
    queue: DispatchRetained<DispatchQueue>,
    /// `None` only during drop.
    objects: Option<QueueBound<Objects>>,
    conns: tokio::sync::Mutex<mpsc::UnboundedReceiver<Incoming>>,
}

type Completion = RcBlock<dyn Fn(*mut NSError)>;

impl AppleMachine {
    fn vm(&self) -> Result<&QueueBound<Objects>, FwError> {
        self.objects.as_ref().ok_or(FwError::Failed {
            op: "use the VM",
            message: "it is being dropped".into(),
        })
    }

    /// Runs `call` on the VM's queue with a completion handler and awaits the handler.
    async fn completion(
        &self,
        op: &'static str,
        call: impl FnOnce(&VZVirtualMachine, &DynBlock<dyn Fn(*mut NSError)>) + Send,
    ) -> Result<(), FwError> {
        let (tx, rx) = oneshot::channel::<Result<(), FwError>>();
        let tx = Mutex::new(Some(tx));
        let block: Completion = RcBlock::new(move |err: *mut NSError| {
            // SAFETY: the framework passes nil or a valid NSError that lives for the call.
            let res = match unsafe { err.as_ref() } {
                None => Ok(()),
                Some(e) => Err(ns_error(op, e)),
            };
            if let Some(tx) = tx.lock().ok().and_then(|mut t| t.take()) {
                let _ = tx.send(res);
            }
        });
        let objects = self.vm()?;
        let block = QueueBound(block);
        run_on(&self.queue, move || call(&objects.get().vm, block.get())).ok_or(
            FwError::Failed {
                op,
                message: "the VM's dispatch queue did not run the call".into(),
            },
        )?;
        match tokio::time::timeout(COMPLETION_TIMEOUT, rx).await {
            Ok(Ok(res)) => res,
            Ok(Err(_)) => Err(FwError::Failed {
                op,
                message: "the framework dropped the completion handler".into(),
            }),
            Err(_) => Err(FwError::Failed {
                op,
                message: format!("no completion within {COMPLETION_TIMEOUT:?}"),
            }),
        }
    }
}

fn fw_state(s: VZVirtualMachineState) -> FwState {
    match s {
        VZVirtualMachineState::Stopped => FwState::Stopped,
        VZVirtualMachineState::Running => FwState::Running,
        VZVirtualMachineState::Paused => FwState::Paused,
        VZVirtualMachineState::Starting => FwState::Starting,
        VZVirtualMachineState::Pausing => FwState::Pausing,
        VZVirtualMachineState::Resuming => FwState::Resuming,
        VZVirtualMachineState::Stopping => FwState::Stopping,
        VZVirtualMachineState::Saving => FwState::Saving,
        VZVirtualMachineState::Restoring => FwState::Restoring,
        _ => FwState::Error,
    }
}

#[async_trait]
impl FwMachine for AppleMachine {
    fn state(&self) -> FwState {
        let Ok(objects) = self.vm() else {
            return FwState::Stopped;
        };
        // SAFETY: property read on the VM's queue.
        run_on(&self.queue, || unsafe { objects.get().vm.state() })
            .map(fw_state)
            .unwrap_or(FwState::Error)
    }

    async fn start(&self) -> Result<(), FwError> {
        self.completion("start the VM", |vm, done| {
            // SAFETY: called on the VM's queue; `done` is a valid completion block.
            unsafe { vm.startWithCompletionHandler(done) }
        })
        .await
    }

    fn request_stop(&self) -> Result<(), FwError> {
        let objects = self.vm()?;
        run_on(&self.queue, || {
            // SAFETY: called on the VM's queue.
            unsafe { objects.get().vm.requestStopWithError() }
                .map_err(|e| ns_error("ask the guest to stop", &e))
        })
        .unwrap_or(Err(FwError::Failed {
            op: "ask the guest to stop",
            message: "the VM's dispatch queue did not run the call".into(),
        }))
    }

    async fn stop(&self) -> Result<(), FwError> {
        self.completion("stop the VM", |vm, done| {
            // SAFETY: called on the VM's queue; `done` is a valid completion block.
            unsafe { vm.stopWithCompletionHandler(done) }
        })
        .await
    }

    fn stop_detached(&self) {
        let Ok(objects) = self.vm() else { return };
        let vm = QueueBound(objects.get().vm.clone());
        self.queue.exec_async(move || {
            let vm = vm.into_inner();
            let done: Completion = RcBlock::new(|_err: *mut NSError| {});
            // SAFETY: runs on the VM's queue; a no-op completion block.
            unsafe { vm.stopWithCompletionHandler(&done) }
        });
    }

    async fn pause(&self) -> Result<(), FwError> {
        self.completion("pause the VM", |vm, done| {
            // SAFETY: called on the VM's queue; `done` is a valid completion block.
            unsafe { vm.pauseWithCompletionHandler(done) }
        })
        .await
    }

    async fn resume(&self) -> Result<(), FwError> {
        self.completion("resume the VM", |vm, done| {
            // SAFETY: called on the VM's queue; `done` is a valid completion block.
            unsafe { vm.resumeWithCompletionHandler(done) }
        })
        .await
    }

    async fn save(&self, path: &Path) -> Result<(), FwError> {
        let url = QueueBound(file_url(path)?);
        self.completion("save the VM state", move |vm, done| {
            // SAFETY: called on the VM's queue (macOS 14+, checked by the caller through
            // `save_restore_support`); `done` is a valid completion block.
            unsafe { vm.saveMachineStateToURL_completionHandler(url.get(), done) }
        })
        .await
    }

    async fn restore(&self, path: &Path) -> Result<(), FwError> {
        let url = QueueBound(file_url(path)?);
        self.completion("restore the VM state", move |vm, done| {
            // SAFETY: called on the VM's queue (macOS 14+, checked by the caller through
            // `save_restore_support`); `done` is a valid completion block.
            unsafe { vm.restoreMachineStateFromURL_completionHandler(url.get(), done) }
        })
        .await
    }

    async fn accept(&self) -> Result<Box<dyn AgentStream>, FwError> {
        let incoming = self
            .conns
            .lock()
            .await
            .recv()
            .await
            .ok_or(FwError::Failed {
                op: "accept the agent connection",
                message: "the vsock listener is gone".into(),
            })?;
        let host = |source| FwError::Host {
            what: "take the guest's vsock connection".into(),
            source,
        };
        let (fd, connection) = incoming.map_err(host)?;
        let stream = stream_from_fd(fd).map_err(host)?;
        Ok(Box::new(VsockStream {
            stream,
            _connection: connection,
        }))
    }
}

impl Drop for AppleMachine {
    fn drop(&mut self) {
        // Release the VM, listener and delegate on the VM's queue, after any queued work.
        if let Some(objects) = self.objects.take() {
            self.queue.exec_async(move || drop(objects.into_inner()));
        }
    }
}
