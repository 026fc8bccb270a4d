"""mmengine 0.10.7's save_checkpoint (mmengine/runner/checkpoint.py) with the
same arguments, warnings and exception messages. A local checkpoint is
written by ckptio's writer straight to its path; other backends (and pavi)
receive the same bytes as from mmengine. mmengine is optional for local
paths; its names are looked up at call time.
"""
import logging

from .mmcv_save import _put_bytes, _save_local, _save_to_pavi

__all__ = ["save_checkpoint"]


def save_checkpoint(checkpoint, filename, file_client_args=None, backend_args=None):
    """Save checkpoint to file.

    Args:
        checkpoint (dict): Module whose params are to be saved.
        filename (str): Checkpoint filename.
        file_client_args (dict, optional): Arguments to instantiate a
            FileClient (deprecated by mmengine in favour of backend_args).
        backend_args (dict, optional): Arguments to instantiate the
            prefix of uri corresponding backend.
    """
    try:
        import mmengine  # noqa: F401
    except ImportError:
        mmengine = None

    if file_client_args is not None:
        if mmengine is not None:
            from mmengine.logging import print_log

            print_log(
                '"file_client_args" will be deprecated in future. '
                'Please use "backend_args" instead',
                logger="current",
                level=logging.WARNING,
            )
        if backend_args is not None:
            raise ValueError(
                '"file_client_args" and "backend_args" cannot be set at the same time.'
            )

    if filename.startswith("pavi://"):
        if file_client_args is not None or backend_args is not None:
            raise ValueError(
                '"file_client_args" or "backend_args" should be "None" if '
                'filename starts with "pavi://"'
            )
        _save_to_pavi(checkpoint, filename)
        return

    if mmengine is None:
        if file_client_args is not None or backend_args is not None or "://" in filename:
            raise ImportError(
                f"saving to {filename!r} with file_client_args={file_client_args!r}, "
                f"backend_args={backend_args!r} needs mmengine"
            )
        _save_local(checkpoint, filename)
        return

    from mmengine.fileio import FileClient, get_file_backend
    from mmengine.fileio.backends import LocalBackend

    # as mmengine: the FileClient is built (and may raise) in both cases
    file_client = FileClient.infer_client(file_client_args, filename)
    if file_client_args is None:
        file_backend = get_file_backend(filename, backend_args=backend_args)
        local = isinstance(file_backend, LocalBackend)
    else:
        file_backend = file_client
        local = isinstance(file_client.client, LocalBackend)
    if local:
        _save_local(checkpoint, filename)
    else:
        _put_bytes(checkpoint, filename, file_backend)
