"""The edge node: one per station; controls the forecourt and keeps selling when HQ is away."""
