use super::*;

fn plan() -> QemuPlan {
    QemuPlan {
        binary: "/usr/bin/qemu-system-x86_64".into(),
        arch: Arch::X86_64,
        accel: Accel::Tcg,
        host: HostOs::Linux,
        cpus: 2,
        memory_mib: 256,
        kernel: FileRef::Fd(7),
        initrd: FileRef::Path("/img/initrd, odd".into()),
        append: "console=ttyS0 quiet".into(),
        rootfs: None,
        disks: Vec::new(),
        qmp: Endpoint::Fd(3),
        console: Endpoint::Fd(4),
        agent: Endpoint::Fd(5),
        agent_port: AGENT_PORT.into(),
        virtio: VirtioTransport::Pci,
        network: None,
        sandbox: true,
        memory: None,
        incoming: false,
        token_file: None,
    }
}

fn args(p: &QemuPlan) -> Vec<String> {
    p.argv()
        .into_iter()
        .map(|a| a.into_string().unwrap())
        .collect()
}

/// The value following `flag` (first occurrence).
fn after<'a>(a: &'a [String], flag: &str) -> Vec<&'a str> {
    a.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].as_str())
        .collect()
}

#[test]
fn linux_tcg_microvm_line() {
    let a = args(&plan());
    assert_eq!(a[0], "/usr/bin/qemu-system-x86_64");
    assert_eq!(after(&a, "-accel"), ["tcg"]);
    assert_eq!(after(&a, "-M"), ["microvm,pcie=on"]);
    assert!(
        after(&a, "-cpu").is_empty(),
        "TCG x86 keeps QEMU's default CPU"
    );
    for f in ["-nodefaults", "-no-user-config", "-no-reboot"] {
        assert!(a.iter().any(|x| x == f), "{f} missing");
    }
    assert_eq!(after(&a, "-display"), ["none"]);
    assert_eq!(after(&a, "-smp"), ["2"]);
    assert_eq!(after(&a, "-m"), ["256M"]);
    assert_eq!(after(&a, "-sandbox"), [SANDBOX]);
    assert_eq!(
        after(&a, "-chardev"),
        [
            "socket,id=qmp,fd=3",
            "socket,id=console,fd=4",
            "socket,id=agent,fd=5"
        ]
    );
    assert_eq!(after(&a, "-mon"), ["chardev=qmp,mode=control"]);
    assert_eq!(after(&a, "-serial"), ["chardev:console"]);
    assert_eq!(
        after(&a, "-device"),
        [
            "virtio-serial-pci",
            "virtserialport,chardev=agent,name=vmcp.agent"
        ]
    );
    assert_eq!(after(&a, "-kernel"), ["/dev/fd/7"]);
    assert_eq!(after(&a, "-initrd"), ["/img/initrd, odd"]);
    assert_eq!(after(&a, "-append"), ["console=ttyS0 quiet"]);
    // No network, no disk, no host file access unless asked.
    for absent in ["-netdev", "-drive", "-virtfs", "-fsdev", "-add-fd"] {
        assert!(!a.iter().any(|x| x == absent), "{absent} present");
    }
}

#[test]
fn rootfs_by_fd_set_read_write_and_network() {
    let mut p = plan();
    p.virtio = VirtioTransport::Mmio;
    p.network = Some(NetPlan {
        restrict: false,
        guestfwd: None,
        hostfwd: Vec::new(),
    });
    p.rootfs = Some(DiskPlan {
        source: DiskSource::FdSet {
            set: 1,
            fds: vec![8, 9],
        },
        read_only: false,
    });
    let a = args(&p);
    assert_eq!(after(&a, "-M"), ["microvm"]);
    assert_eq!(after(&a, "-add-fd"), ["fd=8,set=1", "fd=9,set=1"]);
    assert_eq!(
        after(&a, "-drive"),
        ["file=/dev/fdset/1,format=raw,if=none,id=rootfs,read-only=off"]
    );
    let devs = after(&a, "-device");
    assert!(devs.contains(&"virtio-serial-device"));
    assert!(devs.contains(&"virtio-blk-device,drive=rootfs"));
    assert!(devs.contains(&"virtio-net-device,netdev=net0"));
    assert_eq!(after(&a, "-netdev"), ["user,id=net0"]);
}

#[test]
fn rootfs_by_path_is_escaped() {
    let mut p = plan();
    p.rootfs = Some(DiskPlan {
        source: DiskSource::Path("/d/a,b.img".into()),
        read_only: true,
    });
    let a = args(&p);
    assert_eq!(
        after(&a, "-drive"),
        ["file=/d/a,,b.img,format=raw,if=none,id=rootfs,read-only=on"]
    );
    assert!(after(&a, "-device").contains(&"virtio-blk-pci,drive=rootfs"));
}

#[test]
fn windows_whpx_line_uses_pipes_and_no_sandbox() {
    let mut p = plan();
    p.host = HostOs::Windows;
    p.accel = Accel::Whpx;
    p.binary = "C:\\qemu\\qemu-system-x86_64.exe".into();
    p.sandbox = QemuPlan::sandbox_supported(HostOs::Windows);
    p.qmp = Endpoint::TcpConnect("127.0.0.1:4444".parse().unwrap());
    p.console = Endpoint::NamedPipe("\\\\.\\pipe\\vmcp-console".into());
    p.agent = Endpoint::UnixConnect("/run/a,b.sock".into());
    p.kernel = FileRef::Path("C:\\img\\vmlinuz".into());
    let a = args(&p);
    assert_eq!(after(&a, "-accel"), ["whpx,kernel-irqchip=off"]);
    assert!(after(&a, "-sandbox").is_empty());
    assert_eq!(after(&a, "-cpu"), Vec::<&str>::new());
    assert_eq!(
        after(&a, "-chardev"),
        [
            "socket,id=qmp,host=127.0.0.1,port=4444",
            "pipe,id=console,path=\\\\.\\pipe\\vmcp-console",
            "socket,id=agent,path=/run/a,,b.sock"
        ]
    );
    assert_eq!(after(&a, "-kernel"), ["C:\\img\\vmlinuz"]);
}

#[test]
fn hardware_accels_use_host_cpu_and_arm_uses_virt() {
    let mut p = plan();
    p.accel = Accel::Kvm;
    assert_eq!(after(&args(&p), "-cpu"), ["host"]);
    p.arch = Arch::Aarch64;
    p.host = HostOs::MacOs;
    p.accel = Accel::Hvf;
    p.sandbox = QemuPlan::sandbox_supported(HostOs::MacOs);
    let a = args(&p);
    assert_eq!(after(&a, "-M"), ["virt,gic-version=max"]);
    assert_eq!(after(&a, "-cpu"), ["host"]);
    assert_eq!(after(&a, "-accel"), ["hvf"]);
    p.accel = Accel::Tcg;
    let a = args(&p);
    assert_eq!(after(&a, "-M"), ["virt,gic-version=3"]);
    assert_eq!(after(&a, "-cpu"), ["max"]);
}

fn kargs() -> KernelArgs {
    KernelArgs {
        arch: Arch::X86_64,
        accel: Accel::Tcg,
        tsc_khz: Some(2_596_144),
        token: "abc123".into(),
        token_in_fw_cfg: false,
        agent_port: AGENT_PORT.into(),
        rootfs: None,
        image: None,
        net: None,
        proxy: None,
        shares: Vec::new(),
        extra: vec!["vmcp.debug=1".into()],
    }
}

#[test]
fn kernel_args_for_tcg() {
    let s = kargs().render();
    let words: Vec<&str> = s.split(' ').collect();
    assert_eq!(words[0], "console=ttyS0");
    for w in [
        "quiet",
        "panic=-1",
        "tsc_early_khz=2596144",
        "tsc=reliable",
        "vmcp.token=abc123",
        "vmcp.channel=virtio-serial:vmcp.agent",
    ] {
        assert!(words.contains(&w), "{w} missing in {s}");
    }
    assert!(s.contains("initcall_blacklist="));
    assert_eq!(
        *words.last().unwrap(),
        "vmcp.debug=1",
        "extra args come last"
    );
    assert!(!s.contains("vmcp.rootfs"));
}

#[test]
fn kernel_args_rootfs_kvm_and_arm() {
    let mut k = kargs();
    k.accel = Accel::Kvm;
    k.rootfs = Some(RootfsArg {
        device: "/dev/vda".into(),
        read_only: true,
    });
    let s = k.render();
    assert!(
        !s.contains("tsc_early_khz") && !s.contains("initcall_blacklist"),
        "{s}"
    );
    assert!(s.contains("vmcp.rootfs=/dev/vda vmcp.rootfs_ro=1"), "{s}");
    k.rootfs = Some(RootfsArg {
        device: "/dev/vda".into(),
        read_only: false,
    });
    assert!(k.render().contains("vmcp.rootfs_ro=0"));
    k.arch = Arch::Aarch64;
    let s = k.render();
    assert!(s.starts_with("console=ttyAMA0"), "{s}");
    assert!(!s.contains("i8042"));
    // Unknown TSC frequency: no calibration shortcut.
    let mut k = kargs();
    k.tsc_khz = None;
    assert!(!k.render().contains("tsc_early_khz"));
}

#[test]
fn image_and_scratch_disks_get_their_own_fd_sets_and_kernel_args() {
    let mut p = plan();
    p.disks = vec![
        DiskPlan {
            source: DiskSource::FdSet {
                set: 1,
                fds: vec![9],
            },
            read_only: true,
        },
        DiskPlan {
            source: DiskSource::FdSet {
                set: 2,
                fds: vec![10, 11],
            },
            read_only: false,
        },
    ];
    let a = args(&p);
    assert_eq!(
        after(&a, "-drive"),
        [
            "file=/dev/fdset/1,format=raw,if=none,id=disk1,read-only=on",
            "file=/dev/fdset/2,format=raw,if=none,id=disk2,read-only=off"
        ]
    );
    assert_eq!(
        after(&a, "-add-fd"),
        ["fd=9,set=1", "fd=10,set=2", "fd=11,set=2"]
    );
    let devs = after(&a, "-device");
    assert!(devs.contains(&"virtio-blk-pci,drive=disk1"));
    assert!(devs.contains(&"virtio-blk-pci,drive=disk2"));
    let mut k = kargs();
    k.image = Some(ImageArg {
        device: "/dev/vda".into(),
        scratch: "/dev/vdb".into(),
        user: Some((1000, 100)),
    });
    k.shares = vec![ShareArg {
        device: disk_device(2),
        path: "/work".into(),
        writable: true,
    }];
    let s = k.render();
    assert!(s.contains("vmcp.share=/dev/vdc:/work:rw"), "{s}");
    assert!(
        s.contains("vmcp.image=/dev/vda vmcp.scratch=/dev/vdb vmcp.user=1000:100"),
        "{s}"
    );
}

#[test]
fn memory_files_for_snapshots() {
    let mut p = plan();
    p.memory = Some(MemoryFile {
        file: FileRef::Fd(9),
        shared: true,
    });
    let a = args(&p);
    assert_eq!(after(&a, "-M"), ["microvm,pcie=on,memory-backend=mem"]);
    assert_eq!(
        after(&a, "-object"),
        ["memory-backend-file,id=mem,size=256M,mem-path=/dev/fd/9,share=on"]
    );
    assert!(a.iter().any(|x| x == "-kernel"));
    assert!(!a.iter().any(|x| x == "-incoming"));

    // A restore: copy-on-write, no boot files, state loaded later over QMP.
    p.memory = Some(MemoryFile {
        file: FileRef::Path("/snaps/a,b/memory".into()),
        shared: false,
    });
    p.incoming = true;
    let a = args(&p);
    assert_eq!(
        after(&a, "-object"),
        ["memory-backend-file,id=mem,size=256M,mem-path=/snaps/a,,b/memory,share=off,readonly=on,rom=off"]
    );
    assert_eq!(after(&a, "-incoming"), ["defer"]);
    for absent in ["-kernel", "-initrd", "-append"] {
        assert!(!a.iter().any(|x| x == absent), "{absent} in a restore");
    }
}

#[test]
fn allow_list_network_is_restricted_with_one_forward_and_may_spawn() {
    let mut p = plan();
    p.network = Some(NetPlan {
        restrict: true,
        guestfwd: Some(GuestForward {
            addr: "10.0.2.100".parse().unwrap(),
            port: 3128,
            command: vec![
                "/opt/my tools,x/vmcp".into(),
                "__egress-pipe".into(),
                "127.0.0.1:4567".into(),
            ],
        }),
        hostfwd: vec!["8080:80".parse().unwrap()],
    });
    let a = args(&p);
    assert_eq!(
        after(&a, "-netdev"),
        ["user,id=net0,restrict=on,guestfwd=tcp:10.0.2.100:3128-cmd:'/opt/my tools,,x/vmcp' '__egress-pipe' '127.0.0.1:4567',hostfwd=tcp:127.0.0.1:8080-:80"]
    );
    assert_eq!(after(&a, "-sandbox"), [SANDBOX_SPAWN]);
    assert_eq!(shell_quote("a'b"), "'a'\\''b'");
}

#[test]
fn nat_and_none_keep_the_strict_sandbox() {
    let mut p = plan();
    assert_eq!(after(&args(&p), "-sandbox"), [SANDBOX]);
    p.network = Some(NetPlan {
        restrict: false,
        guestfwd: None,
        hostfwd: Vec::new(),
    });
    let a = args(&p);
    assert_eq!(after(&a, "-sandbox"), [SANDBOX]);
    assert_eq!(after(&a, "-netdev"), ["user,id=net0"]);
}

#[test]
fn kernel_args_carry_the_network() {
    let mut k = kargs();
    k.net = Some(KernelNet {
        addr: "10.0.2.15".parse().unwrap(),
        prefix: 24,
        gateway: None,
        dns: None,
    });
    k.proxy = Some("10.0.2.100:3128".parse().unwrap());
    let s = k.render();
    assert!(
        s.contains("vmcp.net=10.0.2.15/24 vmcp.proxy=10.0.2.100:3128"),
        "{s}"
    );
    assert!(!s.contains("vmcp.gw"), "{s}");
}

#[test]
fn token_via_fw_cfg_leaves_the_command_line() {
    let mut k = kargs();
    k.token_in_fw_cfg = true;
    let line = k.render();
    assert!(!line.contains("abc123"), "{line}");
    assert!(line.contains("vmcp.token_fw_cfg=1"), "{line}");
    let mut p = plan();
    p.append = line;
    p.token_file = Some(FileRef::Fd(7));
    let argv: Vec<String> = p
        .argv()
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let i = argv.iter().position(|a| a == "-fw_cfg").unwrap();
    assert_eq!(argv[i + 1], "name=opt/vmcp/token,file=/dev/fd/7");
    assert!(!argv.iter().any(|a| a.contains("abc123")));
}
