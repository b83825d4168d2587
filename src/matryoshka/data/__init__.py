"""Real data sets: loaders, fixed seeded splits. Nothing here downloads unless asked to."""
