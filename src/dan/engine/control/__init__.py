"""ControlNet: loading ControlNets (``controlnet.py``), running generation under them
(``runs.py``), converting their state dicts from the original layout (``layout.py``), and
the preprocessors that annotate a picture into a control map (``preprocess.py``; OpenPose's
body network in ``openpose_body.py`` and ``openpose_decode.py``).
"""
