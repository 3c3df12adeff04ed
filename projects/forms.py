from django import forms
from django.contrib.auth.forms import AuthenticationForm


class LoginForm(AuthenticationForm):
    username = forms.CharField(
        label="E-mail", widget=forms.TextInput(attrs={"autofocus": True, "autocomplete": "username"})
    )
