//! Element-wise comparison of two tensors' values: the one rule every check of this project
//! uses (tests, `nsa-bench --suite check`, `nsa-infer compare`).
//!
//! A non-finite value on either side is a failure, never a small error: `f32::max` drops a NaN
//! (`0.0f32.max(NAN) == 0.0`), so a fold over differences would report a NaN output as equal.
//! Here any NaN or infinity makes [`Comparison::max_abs`] infinite and names the first one.
//!
//! Relative error is per tensor: the largest absolute difference over the largest magnitude of
//! the reference, with a floor (`max_abs / max(max|reference|, floor)`) so that an all-zero or
//! tiny reference does not turn rounding noise into a huge ratio. The floor is the caller's:
//! choose it below the magnitudes the check is about (see the parity tests).

use std::fmt;

/// Which side of a comparison held a non-finite value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The values under test.
    Ours,
    /// The values they are compared with.
    Reference,
}

/// The first non-finite value found: its index, side and value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NonFinite {
    /// Its element index.
    pub index: usize,
    /// Which side holds it.
    pub side: Side,
    /// The value (NaN or an infinity).
    pub value: f64,
}

/// How far one tensor is from a reference, element by element.
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    /// Elements compared.
    pub len: usize,
    /// Largest `|ours - reference|`; infinite when either side has a non-finite value.
    pub max_abs: f64,
    /// Index of that element (of the first non-finite one, if any).
    pub at: usize,
    /// Largest `|reference|` (finite values only).
    pub max_reference: f64,
    /// The first non-finite value on either side.
    pub non_finite: Option<NonFinite>,
}

/// Two tensors that cannot be compared.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CompareError {
    /// The shapes differ.
    #[error("shapes differ: {ours:?} against the reference's {reference:?}")]
    Shape {
        /// Ours.
        ours: Vec<usize>,
        /// The reference's.
        reference: Vec<usize>,
    },
    /// The numbers of values differ.
    #[error("{ours} values against the reference's {reference}")]
    Length {
        /// Ours.
        ours: usize,
        /// The reference's.
        reference: usize,
    },
}

impl Comparison {
    /// Compares `ours` with `reference` element by element (same length required).
    pub fn of<T: Copy + Into<f64>>(ours: &[T], reference: &[T]) -> Result<Self, CompareError> {
        if ours.len() != reference.len() {
            return Err(CompareError::Length {
                ours: ours.len(),
                reference: reference.len(),
            });
        }
        let mut c = Comparison {
            len: ours.len(),
            max_abs: 0.0,
            at: 0,
            max_reference: 0.0,
            non_finite: None,
        };
        for (i, (&o, &r)) in ours.iter().zip(reference).enumerate() {
            let (o, r): (f64, f64) = (o.into(), r.into());
            if c.non_finite.is_none() {
                let bad = if !o.is_finite() {
                    Some((Side::Ours, o))
                } else if !r.is_finite() {
                    Some((Side::Reference, r))
                } else {
                    None
                };
                if let Some((side, value)) = bad {
                    c.non_finite = Some(NonFinite {
                        index: i,
                        side,
                        value,
                    });
                    c.max_abs = f64::INFINITY;
                    c.at = i;
                }
            }
            if r.is_finite() {
                c.max_reference = c.max_reference.max(r.abs());
            }
            if c.non_finite.is_none() {
                let d = (o - r).abs();
                if d > c.max_abs {
                    c.max_abs = d;
                    c.at = i;
                }
            }
        }
        Ok(c)
    }

    /// [`Comparison::of`] for tensors with shapes: refuses a shape mismatch.
    pub fn of_shaped<T: Copy + Into<f64>>(
        ours: (&[usize], &[T]),
        reference: (&[usize], &[T]),
    ) -> Result<Self, CompareError> {
        if ours.0 != reference.0 {
            return Err(CompareError::Shape {
                ours: ours.0.to_vec(),
                reference: reference.0.to_vec(),
            });
        }
        Self::of(ours.1, reference.1)
    }

    /// Whether both sides are finite everywhere.
    pub fn finite(&self) -> bool {
        self.non_finite.is_none()
    }

    /// `max_abs / max(max|reference|, floor)`; infinite when a value is not finite.
    pub fn relative(&self, floor: f64) -> f64 {
        if !self.finite() {
            return f64::INFINITY;
        }
        self.max_abs / self.max_reference.max(floor).max(f64::MIN_POSITIVE)
    }

    /// Finite, and [`Comparison::relative`]`(floor) <= tolerance`.
    pub fn within_relative(&self, tolerance: f64, floor: f64) -> bool {
        self.finite() && self.relative(floor) <= tolerance
    }

    /// Finite, and `max_abs <= tolerance`.
    pub fn within_abs(&self, tolerance: f64) -> bool {
        self.finite() && self.max_abs <= tolerance
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.non_finite {
            Some(n) => write!(
                f,
                "non-finite value {} in {} at element {} of {}",
                n.value,
                match n.side {
                    Side::Ours => "our output",
                    Side::Reference => "the reference",
                },
                n.index,
                self.len
            ),
            None => write!(
                f,
                "max abs err {:.3e} at element {} (max |reference| {:.3e})",
                self.max_abs, self.at, self.max_reference
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nan_on_either_side_fails_every_tolerance() {
        // `f32::max` would have dropped these: the old folds reported 0 here
        let ours = [1.0f32, f32::NAN, 3.0];
        let reference = [1.0f32, 2.0, 3.0];
        let c = Comparison::of(&ours, &reference).unwrap();
        assert_eq!(c.max_abs, f64::INFINITY);
        assert!(!c.within_abs(1e30));
        assert!(!c.within_relative(1e30, 1.0));
        assert_eq!(c.non_finite.unwrap().index, 1);
        assert_eq!(c.non_finite.unwrap().side, Side::Ours);
        let c = Comparison::of(&reference, &ours).unwrap();
        assert_eq!(c.non_finite.unwrap().side, Side::Reference);
        assert!(!c.within_abs(1e30));
        let all_nan = [f32::NAN; 3];
        assert!(!Comparison::of(&all_nan, &all_nan).unwrap().within_abs(1.0));
        let inf = [f32::INFINITY; 3];
        assert!(!Comparison::of(&inf, &inf).unwrap().within_abs(1.0));
        assert!(format!("{c}").contains("non-finite"));
    }

    #[test]
    fn relative_error_is_per_tensor_with_a_floor() {
        let c = Comparison::of(&[0.0101f32, 0.02], &[0.01f32, 0.02]).unwrap();
        assert!((c.max_abs - 1e-4).abs() < 1e-8);
        assert_eq!(c.at, 0);
        // scale 0.02: 5e-3 relative; a floor of 1 would hide it as 1e-4
        assert!((c.relative(1e-6) - 5e-3).abs() < 1e-5);
        assert!(!c.within_relative(1e-3, 1e-6));
        assert!(c.within_relative(1e-3, 1.0));
        let zero = Comparison::of(&[0.0f32], &[0.0f32]).unwrap();
        assert_eq!(zero.relative(1e-6), 0.0);
    }

    #[test]
    fn mismatched_inputs_are_errors() {
        assert!(Comparison::of(&[1.0f32], &[1.0, 2.0]).is_err());
        assert!(Comparison::of_shaped((&[2, 1], &[1.0f32, 2.0]), (&[1, 2], &[1.0, 2.0])).is_err());
    }
}
