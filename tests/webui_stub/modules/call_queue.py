"""modules/call_queue.py (v1.10.1): queue_lock = fifo_lock.FIFOLock()."""
import threading

queue_lock = threading.Lock()
