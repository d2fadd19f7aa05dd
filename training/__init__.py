"""Offline training and export of the digitserve models."""
