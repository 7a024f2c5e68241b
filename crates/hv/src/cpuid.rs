//! CPUID tables: what KVM supports, made per-vCPU, minus the features the user removes.

use kvm_bindings::{CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, kvm_cpuid_entry2};

use crate::{Error, Result};

/// One CPUID leaf/subleaf and its four output registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuidEntry {
    /// EAX input (leaf).
    pub function: u32,
    /// ECX input (subleaf), meaningful when `indexed` is set.
    pub index: u32,
    /// Whether the subleaf selects the output.
    pub indexed: bool,
    /// Output EAX.
    pub eax: u32,
    /// Output EBX.
    pub ebx: u32,
    /// Output ECX.
    pub ecx: u32,
    /// Output EDX.
    pub edx: u32,
}

/// A CPUID table, as handed to `KVM_SET_CPUID2`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cpuid {
    entries: Vec<CpuidEntry>,
}

#[derive(Debug, Clone, Copy)]
enum Reg {
    Ebx,
    Ecx,
    Edx,
}

/// A CPU feature that can be hidden from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuFeature {
    name: &'static str,
    leaf: u32,
    subleaf: u32,
    reg: Reg,
    bit: u8,
    /// Features that make no sense without this one and are removed with it.
    implies: &'static [&'static str],
}

impl PartialEq for Reg {
    fn eq(&self, other: &Self) -> bool {
        core::mem::discriminant(self) == core::mem::discriminant(other)
    }
}
impl Eq for Reg {}

const fn feat(
    name: &'static str,
    leaf: u32,
    subleaf: u32,
    reg: Reg,
    bit: u8,
    implies: &'static [&'static str],
) -> CpuFeature {
    CpuFeature {
        name,
        leaf,
        subleaf,
        reg,
        bit,
        implies,
    }
}

const AVX_FAMILY: &[&str] = &[
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512dq",
    "avx512cd",
    "avx512bw",
    "avx512vl",
    "vaes",
    "vpclmulqdq",
];

/// The features a user can remove, by Linux `/proc/cpuinfo` name.
static FEATURES: &[CpuFeature] = &[
    feat("sse3", 1, 0, Reg::Ecx, 0, &[]),
    feat("pclmulqdq", 1, 0, Reg::Ecx, 1, &[]),
    feat("ssse3", 1, 0, Reg::Ecx, 9, &[]),
    feat("fma", 1, 0, Reg::Ecx, 12, &[]),
    feat("cx16", 1, 0, Reg::Ecx, 13, &[]),
    feat("pcid", 1, 0, Reg::Ecx, 17, &[]),
    feat("sse4_1", 1, 0, Reg::Ecx, 19, &[]),
    feat("sse4_2", 1, 0, Reg::Ecx, 20, &[]),
    feat("x2apic", 1, 0, Reg::Ecx, 21, &[]),
    feat("movbe", 1, 0, Reg::Ecx, 22, &[]),
    feat("popcnt", 1, 0, Reg::Ecx, 23, &[]),
    feat("tsc_deadline_timer", 1, 0, Reg::Ecx, 24, &[]),
    feat("aes", 1, 0, Reg::Ecx, 25, &[]),
    feat("xsave", 1, 0, Reg::Ecx, 26, AVX_FAMILY),
    feat("avx", 1, 0, Reg::Ecx, 28, AVX_FAMILY),
    feat("f16c", 1, 0, Reg::Ecx, 29, &[]),
    feat("rdrand", 1, 0, Reg::Ecx, 30, &[]),
    feat("mtrr", 1, 0, Reg::Edx, 12, &[]),
    feat("pat", 1, 0, Reg::Edx, 16, &[]),
    feat("fxsr", 1, 0, Reg::Edx, 24, &[]),
    feat("fsgsbase", 7, 0, Reg::Ebx, 0, &[]),
    feat("bmi1", 7, 0, Reg::Ebx, 3, &[]),
    feat("avx2", 7, 0, Reg::Ebx, 5, &[]),
    feat("smep", 7, 0, Reg::Ebx, 7, &[]),
    feat("bmi2", 7, 0, Reg::Ebx, 8, &[]),
    feat("erms", 7, 0, Reg::Ebx, 9, &[]),
    feat("invpcid", 7, 0, Reg::Ebx, 10, &[]),
    feat("avx512f", 7, 0, Reg::Ebx, 16, &[]),
    feat("avx512dq", 7, 0, Reg::Ebx, 17, &[]),
    feat("rdseed", 7, 0, Reg::Ebx, 18, &[]),
    feat("adx", 7, 0, Reg::Ebx, 19, &[]),
    feat("smap", 7, 0, Reg::Ebx, 20, &[]),
    feat("avx512cd", 7, 0, Reg::Ebx, 28, &[]),
    feat("sha_ni", 7, 0, Reg::Ebx, 29, &[]),
    feat("avx512bw", 7, 0, Reg::Ebx, 30, &[]),
    feat("avx512vl", 7, 0, Reg::Ebx, 31, &[]),
    feat("umip", 7, 0, Reg::Ecx, 2, &[]),
    feat("pku", 7, 0, Reg::Ecx, 3, &[]),
    feat("vaes", 7, 0, Reg::Ecx, 9, &[]),
    feat("vpclmulqdq", 7, 0, Reg::Ecx, 10, &[]),
    feat("rdpid", 7, 0, Reg::Ecx, 22, &[]),
    feat("la57", 7, 0, Reg::Ecx, 16, &[]),
    feat("fsrm", 7, 0, Reg::Edx, 4, &[]),
    feat("xsaveopt", 0xd, 1, Reg::Ecx, 0, &[]),
    feat("lahf_lm", 0x8000_0001, 0, Reg::Ecx, 0, &[]),
    feat("abm", 0x8000_0001, 0, Reg::Ecx, 5, &[]),
    feat("sse4a", 0x8000_0001, 0, Reg::Ecx, 6, &[]),
    feat("rdtscp", 0x8000_0001, 0, Reg::Edx, 27, &[]),
    feat("pdpe1gb", 0x8000_0001, 0, Reg::Edx, 26, &[]),
];

impl CpuFeature {
    /// Looks a feature up by its `/proc/cpuinfo` name.
    pub fn by_name(name: &str) -> Option<CpuFeature> {
        FEATURES.iter().find(|f| f.name == name).copied()
    }

    /// The feature's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Names of all features that can be removed.
    pub fn known_names() -> impl Iterator<Item = &'static str> {
        FEATURES.iter().map(|f| f.name)
    }
}

/// One edit of the CPU feature set: currently only removal (`-name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuFeatureEdit {
    /// Hide the feature (and the features that depend on it) from the guest.
    Remove(CpuFeature),
}

/// Parses a feature edit list such as `-xsave,-cx16` (QEMU's `-cpu host,-feat` syntax).
pub fn parse_cpu_features(spec: &str) -> Result<Vec<CpuFeatureEdit>> {
    let mut edits = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some(name) = item.strip_prefix('-') else {
            return Err(Error::BadCpuFeatureEdit(item.to_string()));
        };
        let Some(f) = CpuFeature::by_name(name) else {
            let known: Vec<_> = CpuFeature::known_names().collect();
            return Err(Error::UnknownCpuFeature(name.to_string(), known.join(", ")));
        };
        edits.push(CpuFeatureEdit::Remove(f));
    }
    Ok(edits)
}

impl Cpuid {
    pub(crate) fn from_kvm(cpuid: &CpuId) -> Self {
        let entries = cpuid
            .as_slice()
            .iter()
            .map(|e| CpuidEntry {
                function: e.function,
                index: e.index,
                indexed: e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
            })
            .collect();
        Cpuid { entries }
    }

    pub(crate) fn to_kvm(&self) -> Result<CpuId> {
        let entries: Vec<_> = self
            .entries
            .iter()
            .map(|e| kvm_cpuid_entry2 {
                function: e.function,
                index: e.index,
                flags: if e.indexed {
                    KVM_CPUID_FLAG_SIGNIFCANT_INDEX
                } else {
                    0
                },
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
                padding: [0; 3],
            })
            .collect();
        CpuId::from_entries(&entries).map_err(|_| Error::TooManyEntries("the CPUID table"))
    }

    /// Builds a table from explicit entries.
    pub fn from_entries(entries: Vec<CpuidEntry>) -> Self {
        Cpuid { entries }
    }

    /// All entries.
    pub fn entries(&self) -> &[CpuidEntry] {
        &self.entries
    }

    /// The entry for `function`/`index` (index ignored for leaves that are not indexed).
    pub fn get(&self, function: u32, index: u32) -> Option<&CpuidEntry> {
        self.entries
            .iter()
            .find(|e| e.function == function && (!e.indexed || e.index == index))
    }

    fn for_each_leaf(&mut self, function: u32, mut f: impl FnMut(&mut CpuidEntry)) {
        self.entries
            .iter_mut()
            .filter(|e| e.function == function)
            .for_each(&mut f);
    }

    /// Applies feature edits: each removed feature's bit is cleared, along with the features that
    /// need it (removing `xsave` also removes AVX and friends).
    pub fn apply_edits(&mut self, edits: &[CpuFeatureEdit]) {
        for edit in edits {
            let CpuFeatureEdit::Remove(f) = *edit;
            self.clear_feature(&f);
            for name in f.implies {
                if let Some(dep) = CpuFeature::by_name(name) {
                    self.clear_feature(&dep);
                }
            }
        }
    }

    fn clear_feature(&mut self, f: &CpuFeature) {
        let mask = !(1u32 << f.bit);
        for e in self
            .entries
            .iter_mut()
            .filter(|e| e.function == f.leaf && (!e.indexed || e.index == f.subleaf))
        {
            match f.reg {
                Reg::Ebx => e.ebx &= mask,
                Reg::Ecx => e.ecx &= mask,
                Reg::Edx => e.edx &= mask,
            }
        }
        if f.name == "xsave" {
            // Without XSAVE the state-component leaf must not advertise anything.
            self.for_each_leaf(0xd, |e| {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            });
        }
    }

    /// The table for one vCPU: its APIC ID in leaves 1, 0xB and 0x1F, a flat topology of
    /// `nr_vcpus` single-threaded cores in one package, the hypervisor bit and the KVM signature.
    pub fn for_vcpu(&self, apic_id: u32, nr_vcpus: u32) -> Cpuid {
        let mut t = self.clone();
        let nr = nr_vcpus.max(1);
        // Bits of APIC ID needed to number the cores of the package.
        let core_bits = 32 - (nr - 1).leading_zeros();
        t.for_each_leaf(1, |e| {
            e.ebx = (e.ebx & 0x0000_ffff) | ((apic_id & 0xff) << 24) | ((nr.min(255)) << 16);
            e.ecx |= 1 << 31; // running under a hypervisor
            e.edx |= 1 << 28; // HTT: the logical-count field is valid
        });
        t.for_each_leaf(4, |e| {
            // EAX[31:26]: cores per package - 1; keep cache info in the low bits.
            e.eax = (e.eax & 0x03ff_ffff) | (((nr - 1).min(63)) << 26);
            // Caches shared by at most this thread.
            e.eax &= !(0xfff << 14);
        });
        for leaf in [0xb, 0x1f] {
            t.for_each_leaf(leaf, |e| {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        // SMT level: one thread per core.
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        // Core level.
                        e.eax = core_bits;
                        e.ebx = nr;
                        e.ecx = (2 << 8) | 1;
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i;
                    }
                }
            });
        }
        t.for_each_leaf(0x8000_0008, |e| {
            // ECX[7:0]: number of cores - 1 (AMD), ECX[15:12]: APIC ID size.
            e.ecx = (e.ecx & !0xf0ff) | (nr - 1).min(255) | (core_bits.max(1) << 12);
        });
        t.for_each_leaf(0x8000_001e, |e| {
            e.eax = apic_id;
            e.ebx &= !0xff00; // one thread per core
        });
        // Make sure the KVM signature is present even if the host table lacks it.
        if t.get(0x4000_0000, 0).is_none() {
            t.entries.push(CpuidEntry {
                function: 0x4000_0000,
                eax: 0x4000_0001,
                ebx: u32::from_le_bytes(*b"KVMK"),
                ecx: u32::from_le_bytes(*b"VMKV"),
                edx: u32::from_le_bytes(*b"M\0\0\0"),
                ..Default::default()
            });
        }
        t
    }
}

#[cfg(test)]
#[path = "cpuid_test.rs"]
mod tests;
