//! Strict decoding of KVM's state structs. kvm-bindings decodes one of them from
//! however many bytes it is given, zero-padding a short one and cutting a long
//! one (its way to carry states across kernel versions). A saved state is read
//! from a file or a socket, so a short or long struct is damage: a truncated
//! `kvm_xsave` would silently load zeroed FPU/SSE registers into the guest. Here
//! each struct must come with exactly its size in bytes; only then is it handed
//! to kvm-bindings' own decoding.

use std::marker::PhantomData;

use serde::de::{DeserializeOwned, Error as _, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// The struct's name without its module path (`kvm_xsave`).
fn short_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    full.rsplit("::").next().unwrap_or(full)
}

/// Reads the bytes of one `T`: a byte string (binary encodings) or a sequence of
/// numbers (JSON), refusing any other length than `size_of::<T>()`.
struct ExactBytes<T>(PhantomData<T>);

impl<T> ExactBytes<T> {
    fn check<E: serde::de::Error>(bytes: Vec<u8>) -> Result<Vec<u8>, E> {
        let size = std::mem::size_of::<T>();
        if bytes.len() != size {
            return Err(E::custom(format!("{} holds {} bytes, it must hold {size}", short_name::<T>(), bytes.len())));
        }
        Ok(bytes)
    }
}

impl<'de, T> Visitor<'de> for ExactBytes<T> {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the {} bytes of a {}", std::mem::size_of::<T>(), short_name::<T>())
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
        Self::check(v.to_vec())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        let size = std::mem::size_of::<T>();
        let mut bytes = Vec::with_capacity(size);
        while let Some(b) = seq.next_element::<u8>()? {
            if bytes.len() == size {
                // Count the rest only to say how long it was, never keeping it.
                let mut n = size + 1;
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    n += 1;
                }
                return Err(A::Error::custom(format!("{} holds {n} bytes, it must hold {size}", short_name::<T>())));
            }
            bytes.push(b);
        }
        Self::check(bytes)
    }
}

/// One KVM struct of exactly its size (`#[serde(deserialize_with = "exact::one")]`).
pub fn one<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<T, D::Error> {
    let bytes = d.deserialize_bytes(ExactBytes::<T>(PhantomData))?;
    T::deserialize(serde::de::value::BytesDeserializer::<D::Error>::new(&bytes))
}

/// A list of KVM structs, each of exactly its size.
pub fn list<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<Vec<T>, D::Error> {
    /// One element of the list, read by [`one`].
    struct Exact<T>(T);
    impl<'de, T: DeserializeOwned> Deserialize<'de> for Exact<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            one(d).map(Exact)
        }
    }
    let v: Vec<Exact<T>> = Vec::deserialize(d)?;
    Ok(v.into_iter().map(|e| e.0).collect())
}

#[cfg(test)]
mod tests {
    use kvm_bindings::{kvm_msr_entry, kvm_xsave};

    #[derive(serde::Deserialize)]
    struct Holder {
        #[serde(deserialize_with = "super::one")]
        xsave: kvm_xsave,
        #[serde(deserialize_with = "super::list")]
        msrs: Vec<kvm_msr_entry>,
    }

    fn json(xsave_len: usize, msr_len: usize) -> String {
        let bytes = |n: usize| serde_json::to_string(&vec![7u8; n]).unwrap();
        format!("{{\"xsave\": {}, \"msrs\": [{}]}}", bytes(xsave_len), bytes(msr_len))
    }

    #[test]
    fn structs_of_their_exact_size_decode_in_json_and_binary() {
        let h: Holder = serde_json::from_str(&json(4096, 16)).unwrap();
        assert_eq!(h.xsave.region[1023], 0x0707_0707);
        assert_eq!(h.msrs[0].index, 0x0707_0707);
        // postcard: the byte strings kvm-bindings writes.
        let mut bin = postcard::to_stdvec(&serde_bytes_like(&[9u8; 4096])).unwrap();
        bin.extend(postcard::to_stdvec(&1u8).unwrap());
        bin.extend(postcard::to_stdvec(&serde_bytes_like(&[9u8; 16])).unwrap());
        let h: Holder = postcard::from_bytes(&bin).unwrap();
        assert_eq!(h.xsave.region[0], 0x0909_0909);
        assert_eq!(h.msrs.len(), 1);
    }

    #[test]
    fn short_and_long_structs_are_refused_by_name() {
        for (x, m, needle) in [
            (4000, 16, "kvm_xsave holds 4000 bytes, it must hold 4096"),
            (4097, 16, "kvm_xsave holds 4097 bytes, it must hold 4096"),
            (0, 16, "kvm_xsave holds 0 bytes"),
            (4096, 15, "kvm_msr_entry holds 15 bytes, it must hold 16"),
        ] {
            let e = serde_json::from_str::<Holder>(&json(x, m)).err().expect("refused");
            assert!(e.to_string().contains(needle), "{e}");
        }
        let short = postcard::to_stdvec(&serde_bytes_like(&[9u8; 100])).unwrap();
        let e = postcard::from_bytes::<Holder>(&short).err().expect("refused");
        assert!(matches!(e, postcard::Error::SerdeDeCustom), "{e}");
    }

    /// Bytes serialized as a byte string, as kvm-bindings does.
    fn serde_bytes_like(b: &[u8]) -> impl serde::Serialize + '_ {
        struct B<'a>(&'a [u8]);
        impl serde::Serialize for B<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(self.0)
            }
        }
        B(b)
    }
}
