"""Ray side of megacov: cluster connection, worker groups and their placement."""
