from django.db import models


class StoredMessage(models.Model):
    """A message the ``stored`` namespace's publish hook saved before it went out."""

    channel = models.CharField(max_length=200)
    username = models.CharField(max_length=150)
    text = models.TextField()
