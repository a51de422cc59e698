"""The official UniPose network ([POSE], `unipose.*`): swin.py (backbone), layers.py (transformer layers),
network.py (UniPoseNet.forward_tensors). The TaskDecoder around it is ../pose.py."""
