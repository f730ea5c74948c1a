/*
 * Test-only stand-in for bcryptprimitives.dll under wine.
 *
 * Rust's standard library (1.78+) imports ProcessPrng from bcryptprimitives.dll for its
 * random numbers. Wine 8 (Debian 12) has no such export, so every Rust executable is
 * rejected by wine's loader before main. scripts/test.d/40-windows.sh builds this file
 * with mingw-w64 into a temporary folder next to a copy of vmcp.exe; it is never shipped,
 * and real Windows (10 and later) has the real DLL.
 *
 * ProcessPrng is documented to always succeed and return TRUE; this stub fills the buffer
 * from RtlGenRandom (advapi32!SystemFunction036), which wine implements.
 */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG chunk = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!SystemFunction036(data, chunk))
            return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
