"""deploykit serve's gunicorn worker class (gthread that answers a kept-alive client's next request in the
same thread), importable by path for ``bench_overhead.py --worker deploykit``:
``gunicorn --worker-class overhead_worker.DeployKitWorker``."""

from deploykit.serve.runner import worker_class

DeployKitWorker = worker_class()
