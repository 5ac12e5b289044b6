//! Differences between the Kubernetes API versions k8s-openapi can be built
//! for (the binary picks one): `EndpointSlice.endpoints` is a `Vec` up to
//! 1.35 and an `Option<Vec>` from 1.36.

/// Read and write access to a list field that is `Vec<T>` in some API
/// versions and `Option<Vec<T>>` in others.
pub trait ListField<T> {
    fn items(&self) -> &[T];
    fn items_mut(&mut self) -> &mut Vec<T>;
}

impl<T> ListField<T> for Vec<T> {
    fn items(&self) -> &[T] {
        self
    }
    fn items_mut(&mut self) -> &mut Vec<T> {
        self
    }
}

impl<T> ListField<T> for Option<Vec<T>> {
    fn items(&self) -> &[T] {
        self.as_deref().unwrap_or_default()
    }
    fn items_mut(&mut self) -> &mut Vec<T> {
        self.get_or_insert_with(Vec::new)
    }
}
