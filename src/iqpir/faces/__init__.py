"""Faces in whole photos: detection backends, 5-point alignment, paste-back.

`import iqpir.faces` loads no optional dependency: dlib (extra `faces`) and facexlib are
imported when a detector is built.

    from iqpir.faces import restore_photo
    restored, report = restore_photo(image, lambda faces: restorer.restore(faces, quality=1.0))
"""

from iqpir.faces.align import (
    FACE_SIZE,
    align_face,
    face_mask,
    invert_affine,
    paste_faces,
    similarity_from_points,
    warp_affine,
)
from iqpir.faces.detect import (
    DETECTORS,
    TEMPLATE_DLIB5_512,
    TEMPLATE_RETINAFACE_512,
    DlibDetector,
    Face,
    FaceDetector,
    RetinaFaceDetector,
    get_detector,
)
from iqpir.faces.pipeline import draw_faces, resize_lanczos, restore_photo, select_faces

__all__ = [
    "DETECTORS", "FACE_SIZE", "TEMPLATE_DLIB5_512", "TEMPLATE_RETINAFACE_512", "DlibDetector", "Face", "FaceDetector",
    "RetinaFaceDetector", "align_face", "draw_faces", "face_mask", "get_detector", "invert_affine", "paste_faces",
    "resize_lanczos", "restore_photo", "select_faces", "similarity_from_points", "warp_affine",
]
