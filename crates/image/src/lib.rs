//! Guest image builder: kernel + initramfs from pinned inputs into a cache directory.
