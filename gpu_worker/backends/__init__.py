"""Model backends behind one contract (see base.py and executor.py); `select` picks one."""
